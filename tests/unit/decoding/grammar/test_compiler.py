"""Grammar compilation: the compiler's errors are 400s naming the grammar; size is bounded."""

from __future__ import annotations

import pytest

from decoding.grammar import GrammarParams
from models.errors import InvalidRequestError
from tests.unit.decoding.grammar.toy import GRAMMAR, toy_compiler


@pytest.mark.parametrize(
    ("syntax", "grammar"),
    [("ebnf", "root ::= "), ("json_schema", '{"type": "objec"}'), ("regex", "a(b"), ("lark", "start: ???")],
)
def test_bad_grammars_are_400s_with_the_compilers_message(syntax: str, grammar: str):
    with pytest.raises(InvalidRequestError) as info_error:
        toy_compiler().compile(GrammarParams(syntax=syntax, grammar=grammar))  # type: ignore[arg-type]
    assert info_error.value.param == "alignment.grammar.grammar" and "does not compile" in info_error.value.message


def test_oversized_grammars_are_rejected():
    with pytest.raises(InvalidRequestError, match="at most 10"):
        toy_compiler(max_grammar_bytes=10).compile(GRAMMAR)
