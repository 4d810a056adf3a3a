"""The in-process engine against the tiny base model and direct forward passes."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from models.engine import LogitsProcessor, SamplingParams
from models.errors import InvalidRequestError
from models.hf import HFEngine

PROMPT = "def parse(text):\n    "


@pytest.fixture(scope="module")
def engine(tiny_models: Path) -> HFEngine:
    return HFEngine("tiny-base", tiny_models / "base", workers=2)


@pytest.fixture(scope="module")
def reference_model(tiny_models: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_models / "base").eval()


def forward_logprobs(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0].float(), dim=-1)


async def test_n_samples_share_the_prompt_and_differ(engine: HFEngine):
    completion = await engine.generate(PROMPT, SamplingParams(max_tokens=12, n=4, seed=3))
    assert [sample.index for sample in completion.samples] == [0, 1, 2, 3]
    assert len({tuple(sample.token_ids) for sample in completion.samples}) == 4
    assert completion.prompt_token_ids == engine.tokenizer.encode(PROMPT)
    assert completion.completion_tokens == sum(len(s.token_ids) for s in completion.samples)


async def test_generated_logprobs_agree_with_a_forward_pass(engine: HFEngine, reference_model: torch.nn.Module):
    completion = await engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0.8, seed=5, logprobs=3))
    sample = completion.samples[0]
    prompt_len = len(completion.prompt_token_ids)
    expected = forward_logprobs(reference_model, completion.prompt_token_ids + sample.token_ids)
    assert sample.logprobs is not None and len(sample.logprobs) == len(sample.token_ids)
    for step, record in enumerate(sample.logprobs):
        row = expected[prompt_len + step - 1]
        assert record.token_id == sample.token_ids[step]
        assert record.logprob == pytest.approx(row[record.token_id].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [alt.token_id for alt in record.top] == top.indices.tolist()
        assert [alt.logprob for alt in record.top] == pytest.approx(top.values.tolist(), abs=1e-4)


async def test_prompt_logprobs_agree_with_a_forward_pass(engine: HFEngine, reference_model: torch.nn.Module):
    completion = await engine.generate(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=2))
    ids = completion.prompt_token_ids
    expected = forward_logprobs(reference_model, ids)
    assert completion.prompt_logprobs is not None and completion.prompt_logprobs[0] is None
    for position, record in enumerate(completion.prompt_logprobs[1:], start=1):
        assert record is not None and record.token_id == ids[position]
        assert record.logprob == pytest.approx(expected[position - 1, ids[position]].item(), abs=1e-4)
        assert len(record.top) == 2


async def test_greedy_is_the_argmax_of_a_forward_pass(engine: HFEngine, reference_model: torch.nn.Module):
    completion = await engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))
    ids = list(completion.prompt_token_ids)
    for token in completion.samples[0].token_ids:
        assert token == forward_logprobs(reference_model, ids)[-1].argmax().item()
        ids.append(token)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1e-6), (1.0, 5e-324), (1.401298464324817e-45, 1.0)])
async def test_a_tiny_top_p_or_temperature_is_greedy(engine: HFEngine, temperature: float, top_p: float):
    greedy = await engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))
    extreme = SamplingParams(max_tokens=8, temperature=temperature, top_p=top_p, seed=1)
    assert (await engine.generate(PROMPT, extreme)).samples[0].token_ids == greedy.samples[0].token_ids


async def test_stop_string_truncates_and_reports_stop(engine: HFEngine):
    free = await engine.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0))
    text = free.samples[0].text
    stop = text[6:9]
    stopped = await engine.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))
    assert stopped.samples[0].text == text[: text.index(stop)]
    assert stopped.samples[0].finish_reason == "stop"
    assert free.samples[0].finish_reason == "length"


async def test_seed_reproduces_samples(engine: HFEngine):
    params = SamplingParams(max_tokens=10, n=2, seed=1234)
    first, second = await engine.generate(PROMPT, params), await engine.generate(PROMPT, params)
    other = await engine.generate(PROMPT, SamplingParams(max_tokens=10, n=2, seed=4321))
    assert [s.token_ids for s in first.samples] == [s.token_ids for s in second.samples]
    assert [s.token_ids for s in first.samples] != [s.token_ids for s in other.samples]


async def test_stream_deltas_add_up_to_the_completion(engine: HFEngine):
    params = SamplingParams(max_tokens=16, n=2, seed=9, logprobs=0)
    completion = await engine.generate(PROMPT, params)
    texts, tokens, finish = ["", ""], [[], []], [None, None]
    async for delta in engine.stream(PROMPT, params):
        texts[delta.index] += delta.text
        tokens[delta.index] += delta.token_ids
        finish[delta.index] = delta.finish_reason
    assert texts == [sample.text for sample in completion.samples]
    assert tokens == [sample.token_ids for sample in completion.samples]
    assert finish == [sample.finish_reason for sample in completion.samples]


async def test_concurrent_requests_match_sequential_ones(engine: HFEngine):
    seeds = range(6)
    sequential = [await engine.generate(PROMPT, SamplingParams(max_tokens=8, seed=seed)) for seed in seeds]
    concurrent = await asyncio.gather(*(engine.generate(PROMPT, SamplingParams(max_tokens=8, seed=s)) for s in seeds))
    assert [c.samples[0].token_ids for c in concurrent] == [c.samples[0].token_ids for c in sequential]


class ForceToken:
    """Leaves only ``token`` possible; counts the steps it saw."""

    def __init__(self, token: int, counter: list[int] | None = None) -> None:
        self.token = token
        self.counter = counter

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.counter is not None:
            self.counter[0] += 1
        forced = torch.full_like(logits, float("-inf"))
        forced[self.token] = 0.0
        return forced


async def test_logits_processors_shape_the_samples_but_not_the_logprobs(engine: HFEngine):
    token = engine.tokenizer.encode(" value")[0]

    def make() -> LogitsProcessor:
        return ForceToken(token)

    completion = await engine.generate(PROMPT, SamplingParams(max_tokens=5, n=2, logprobs=0, logits_processors=(make,)))
    for sample in completion.samples:
        assert sample.token_ids == [token] * 5
        assert sample.logprobs is not None and all(record.logprob < 0 for record in sample.logprobs)


async def test_processors_are_not_called_for_finished_sequences(engine: HFEngine):
    """Sample 0 ends at once (EOS forced), sample 1 runs to the budget: 0's processor sees one position only."""
    eos, token = min(engine.tokenizer.eos_ids), engine.tokenizer.encode(" value")[0]
    seen: list[list[int]] = []

    class EndFirst(ForceToken):
        def __init__(self) -> None:
            super().__init__(eos if not seen else token)
            self.calls: list[int] = []
            seen.append(self.calls)

        def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
            self.calls.append(len(output_ids))
            return super().__call__(output_ids, logits)

    completion = await engine.generate(PROMPT, SamplingParams(max_tokens=6, n=2, logits_processors=(EndFirst,)))
    assert [s.finish_reason for s in completion.samples] == ["stop", "length"]
    assert seen == [[0], [0, 1, 2, 3, 4, 5]]


async def test_closing_a_stream_stops_generation(engine: HFEngine):
    steps = [0]
    token = engine.tokenizer.encode(" value")[0]
    params = SamplingParams(max_tokens=1500, logits_processors=(lambda: ForceToken(token, steps),))
    stream = engine.stream(PROMPT, params)
    await anext(stream)
    await stream.aclose()
    await asyncio.sleep(0.3)
    settled = steps[0]
    await asyncio.sleep(0.3)
    assert steps[0] == settled < 1500


async def test_cancelling_generate_stops_the_worker(engine: HFEngine):
    steps = [0]
    token = engine.tokenizer.encode(" value")[0]
    params = SamplingParams(max_tokens=1500, logits_processors=(lambda: ForceToken(token, steps),))
    task = asyncio.create_task(engine.generate(PROMPT, params))
    while steps[0] == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)
    settled = steps[0]
    await asyncio.sleep(0.3)
    assert steps[0] == settled < 1500


async def test_token_id_prompts_are_checked(engine: HFEngine):
    with pytest.raises(InvalidRequestError) as info:
        await engine.generate([1, 10**6], SamplingParams(max_tokens=1))
    assert info.value.param == "prompt"


async def test_chat_template_rendering(tiny_models: Path, engine: HFEngine):
    chat = HFEngine("tiny-chat", tiny_models / "chat")
    rendered = chat.tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(InvalidRequestError):
        engine.tokenizer.render_chat([{"role": "user", "content": "Hi"}])


def test_workers_bound_concurrency(tiny_models: Path):
    """Requests beyond ``workers`` wait: at most that many generations run at once."""
    engine = HFEngine("tiny-base", tiny_models / "base", workers=2)
    max_tokens, running, peak, lock = 20, [0], [0], threading.Lock()

    class Track(ForceToken):
        def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
            with lock:
                if not output_ids:
                    running[0] += 1
                    peak[0] = max(peak[0], running[0])
                elif len(output_ids) == max_tokens - 1:
                    running[0] -= 1
            return super().__call__(output_ids, logits)

    async def main() -> None:
        token = engine.tokenizer.encode(" value")[0]
        params = SamplingParams(max_tokens=max_tokens, logits_processors=(lambda: Track(token),))
        await asyncio.gather(*(engine.generate(PROMPT, params) for _ in range(6)))

    asyncio.run(main())
    assert peak[0] == 2
