"""The plain strategy: one engine call samples all ``n`` answers (logits processors run inside it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from decoding.base import MethodParams, PromptInput, with_n
from models.engine import Engine

if TYPE_CHECKING:
    from decoding.pipeline import Candidate, Prepared


class PlainStrategy:
    """Chat prompts through the model's own template; completions prompts as given."""

    def __init__(self, params: MethodParams | None = None) -> None:
        self.params = params

    async def render(self, base: Engine, prompt: PromptInput) -> str | None:
        if prompt.messages is not None:
            return await base.render_chat(prompt.messages)
        return prompt.text

    async def generate(self, prepared: Prepared, n: int) -> list[Candidate]:
        from decoding.pipeline import Candidate

        completion = await prepared.engine.generate(prepared.prompt_ids, with_n(prepared.sampling, n))
        prepared.prompt_logprobs = completion.prompt_logprobs
        candidates = []
        for sample in completion.samples:
            candidate = Candidate(sample.text, sample.token_ids, sample.finish_reason, sample.logprobs)
            if prepared.constraint is not None:
                grammar = prepared.constraint.details(sample.token_ids)
                candidate.details["grammar"] = grammar
                if not grammar.complete:
                    candidate.finish_reason = "length"  # cut off before the grammar could complete
            candidates.append(candidate)
        return candidates


def plain_text_prompt(messages: Sequence[Mapping[str, str]], cue: str = "Assistant:") -> str:
    """A chat as plain text, for base models without a chat template: system text, turns, an answer cue."""
    lines = []
    for message in messages:
        if message["role"] == "system":
            lines.append(f"{message['content']}\n")
        else:
            lines.append(f"{'User' if message['role'] == 'user' else 'Assistant'}: {message['content']}")
    return "\n".join([*lines, cue])
