"""Grammars compiled for a tokenizer (xgrammar), and the checks that need no tokenizer."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from decoding.grammar.params import WORKER_ARG, GrammarParams
from models.errors import InvalidRequestError

if TYPE_CHECKING:
    import xgrammar


class GrammarCompiler:
    """Compiles grammars for one tokenizer (xgrammar caches compiled grammars).

    Args:
        tokenizer: a Hugging Face tokenizer, or an ``xgrammar.TokenizerInfo``.
        vocab_size: the model's logits width.
        stop_ids: the model's end-of-sequence ids.
        max_grammar_bytes: larger grammars are rejected.
    """

    def __init__(
        self, tokenizer: Any, *, vocab_size: int, stop_ids: Sequence[int], max_grammar_bytes: int = 65_536
    ) -> None:
        import xgrammar

        if isinstance(tokenizer, xgrammar.TokenizerInfo):
            info = tokenizer
        else:
            info = xgrammar.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
            )
        self.vocab_size = info.vocab_size
        self.max_grammar_bytes = max_grammar_bytes
        self._compiler = xgrammar.GrammarCompiler(info)

    def compile(self, params: GrammarParams) -> xgrammar.CompiledGrammar:
        if len(params.grammar.encode()) > self.max_grammar_bytes:
            raise InvalidRequestError(
                f"The grammar is {len(params.grammar.encode())} bytes; this server accepts at most "
                f"{self.max_grammar_bytes}.",
                param="alignment.grammar.grammar",
            )
        compile_by_syntax: dict[str, Callable[[str], xgrammar.CompiledGrammar]] = {
            "ebnf": self._compiler.compile_grammar,
            "json_schema": self._compiler.compile_json_schema,
            "regex": self._compiler.compile_regex,
            "lark": self._compiler.compile_lark,
        }
        try:
            return compile_by_syntax[params.syntax](params.grammar)
        except (RuntimeError, ValueError) as exc:
            raise InvalidRequestError(
                f"The {params.syntax} grammar does not compile: {compiler_message(exc)}",
                param="alignment.grammar.grammar",
            ) from exc


def parse_grammar(params: GrammarParams) -> None:
    """Parses the grammar without a tokenizer (what workers check at admission); raises ValueError."""
    import xgrammar

    parse_by_syntax: dict[str, Callable[[str], xgrammar.Grammar]] = {
        "ebnf": xgrammar.Grammar.from_ebnf,
        "json_schema": xgrammar.Grammar.from_json_schema,
        "regex": xgrammar.Grammar.from_regex,
        "lark": xgrammar.Grammar.from_lark,
    }
    try:
        parse_by_syntax[params.syntax](params.grammar)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"The {params.syntax} grammar does not compile: {compiler_message(exc)}") from exc


def compiler_message(exc: Exception) -> str:
    """xgrammar's message without its ``[time] file.cc:line:`` prefix."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^\[[\d:.]+\] \S+:\d+: ", "", first_line)


def worker_grammar(extra_args: Mapping[str, Any] | None) -> GrammarParams | None:
    """A vLLM request's grammar from its ``vllm_xargs`` (None: it has none); raises ValueError."""
    if not extra_args or WORKER_ARG not in extra_args:
        return None
    try:
        params = GrammarParams.model_validate_json(extra_args[WORKER_ARG])
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"`vllm_xargs.{WORKER_ARG}` is not a valid alignd grammar: {exc}") from exc
    parse_grammar(params)
    return params
