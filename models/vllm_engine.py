"""The vLLM engine: vLLM's OpenAI-compatible workers behind the Engine protocol.

Prompts always go to the workers as token ids (the gateway holds the
tokenizer), so text is never re-tokenised between rounds of a multi-call
method, and vLLM's prefix cache sees identical prefixes.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import aclosing, contextmanager
from typing import Any

from models.engine import (
    Completion,
    EngineInfo,
    FinishReason,
    Prompt,
    Sample,
    SampleDelta,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from models.errors import InvalidRequestError, UpstreamError
from models.tokenizer import Tokenizer
from models.vllm_service import VLLMService

_TOKEN_ID_PREFIX = "token_id:"


class VLLMEngine:
    """A model served by vLLM workers.

    Args:
        name: the model name clients use.
        tokenizer: the model's tokenizer, loaded in the gateway.
        service: the workers (replicas, routing, HTTP).
        served_name: the name the workers serve the model under.
        max_model_len: the context limit, as the workers report it.
        max_logprobs: the workers' ``--max-logprobs``.
        worker_plugins: the alignd plugins the workers load (e.g. ``grammar``).
    """

    def __init__(
        self,
        name: str,
        tokenizer: Tokenizer,
        service: VLLMService,
        *,
        served_name: str,
        max_model_len: int,
        max_logprobs: int,
        worker_plugins: frozenset[str] = frozenset(),
    ) -> None:
        self._tokenizer = tokenizer
        self.service = service
        self._served_name = served_name
        self._info = EngineInfo(
            name=name,
            max_model_len=max_model_len,
            max_logprobs=max_logprobs,
            has_chat_template=tokenizer.has_chat_template,
            tokenizer_id=tokenizer.fingerprint,
            eos_token_ids=tokenizer.eos_ids,
            vocab_size=tokenizer.vocab_size,
            worker_plugins=worker_plugins,
        )

    @classmethod
    async def create(
        cls,
        name: str,
        tokenizer: Tokenizer,
        service: VLLMService,
        *,
        served_name: str,
        max_logprobs: int,
        worker_plugins: frozenset[str] = frozenset(),
    ) -> VLLMEngine:
        """Asks the workers for the served model's context length."""
        models = await service.get_json("/v1/models")
        cards = {card["id"]: card for card in models.get("data", [])}
        if served_name not in cards:
            raise RuntimeError(f"the workers of `{name}` serve {sorted(cards)}, not `{served_name}`")
        max_model_len = int(cards[served_name]["max_model_len"])
        return cls(
            name, tokenizer, service, served_name=served_name, max_model_len=max_model_len,
            max_logprobs=max_logprobs, worker_plugins=worker_plugins,
        )  # fmt: skip

    @property
    def info(self) -> EngineInfo:
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        prompt_ids = self.tokenizer.prompt_ids(prompt)
        body = self._body(prompt_ids, params, stream=False)
        response = await self.service.post_json("/v1/completions", body, affinity=params.affinity)
        with _read_from_worker():
            choices = sorted(response["choices"], key=lambda choice: choice["index"])
            samples = [self._sample(choice, params) for choice in choices]
            prompt_logprobs = None
            if params.prompt_logprobs is not None and choices:
                prompt_logprobs = self._prompt_logprobs(prompt_ids, choices[0].get("prompt_logprobs"), params)
        return Completion(prompt_ids, samples, prompt_logprobs)

    async def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Completion]:
        """One request for every prompt: vLLM numbers the choices prompt by prompt, ``n`` each."""
        batch = [self.tokenizer.prompt_ids(prompt) for prompt in prompts]
        body = {**self._body(batch[0], params, stream=False), "prompt": batch}
        response = await self.service.post_json("/v1/completions", body, affinity=params.affinity)
        with _read_from_worker():
            choices = sorted(response["choices"], key=lambda choice: choice["index"])
            completions = []
            for position, prompt_ids in enumerate(batch):
                mine = choices[position * params.n : (position + 1) * params.n]
                samples = [self._sample({**choice, "index": i}, params) for i, choice in enumerate(mine)]
                prompt_logprobs = None
                if params.prompt_logprobs is not None and mine:
                    prompt_logprobs = self._prompt_logprobs(prompt_ids, mine[0].get("prompt_logprobs"), params)
                completions.append(Completion(prompt_ids, samples, prompt_logprobs))
        return completions

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncGenerator[SampleDelta, None]:
        prompt_ids = self.tokenizer.prompt_ids(prompt)
        body = self._body(prompt_ids, params, stream=True)
        async with aclosing(self.service.stream_json("/v1/completions", body, affinity=params.affinity)) as chunks:
            async for chunk in chunks:
                with _read_from_worker():
                    deltas = [self._delta(choice, params) for choice in chunk.get("choices", [])]
                for delta in deltas:
                    yield delta

    async def close(self) -> None:
        await self.service.close()

    def _body(self, prompt_ids: list[int], params: SamplingParams, *, stream: bool) -> dict[str, Any]:
        if params.logits_processors:
            raise InvalidRequestError(
                f"The model `{self._info.name}` runs on vLLM workers, which take logits processors only as "
                "worker plugins.",
                param="alignment",
            )
        body: dict[str, Any] = {
            "model": self._served_name,
            "prompt": prompt_ids,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "stop": list(params.stop),
            "seed": params.seed,
            "stream": stream,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
        }
        if params.logprobs is not None:
            body["logprobs"] = params.logprobs
        if params.prompt_logprobs is not None and not stream:
            body["prompt_logprobs"] = params.prompt_logprobs
        if params.worker_args:
            body["vllm_xargs"] = dict(params.worker_args)
        return body

    def _sample(self, choice: dict[str, Any], params: SamplingParams) -> Sample:
        return Sample(
            index=choice["index"],
            text=choice.get("text") or "",
            token_ids=list(choice.get("token_ids") or []),
            finish_reason=_finish_reason(choice.get("finish_reason")) or "length",
            logprobs=self._logprobs(choice.get("logprobs"), params),
        )

    def _delta(self, choice: dict[str, Any], params: SamplingParams) -> SampleDelta:
        return SampleDelta(
            index=int(choice["index"]),
            text=choice.get("text") or "",
            token_ids=list(choice.get("token_ids") or []),
            logprobs=self._logprobs(choice.get("logprobs"), params),
            finish_reason=_finish_reason(choice.get("finish_reason")),
        )

    def _logprobs(self, data: dict[str, Any] | None, params: SamplingParams) -> list[TokenLogprob] | None:
        """vLLM's legacy logprobs (tokens spelled ``token_id:N``) as records with our token texts."""
        if params.logprobs is None or data is None:
            return None
        records = []
        for token, logprob, top in zip(data["tokens"], data["token_logprobs"], data["top_logprobs"], strict=True):
            token_id = _token_id(token)
            alternatives = sorted(((_token_id(t), lp) for t, lp in (top or {}).items()), key=lambda item: -item[1])
            records.append(
                TokenLogprob(
                    token_id,
                    self.tokenizer.token_text(token_id),
                    float(logprob),
                    tuple(TopLogprob(i, self.tokenizer.token_text(i), lp) for i, lp in alternatives[: params.logprobs]),
                )
            )
        return records

    def _prompt_logprobs(
        self, prompt_ids: list[int], data: list[dict[str, Any] | None] | None, params: SamplingParams
    ) -> list[TokenLogprob | None]:
        if data is None or len(data) != len(prompt_ids):
            raise UpstreamError("The model worker returned no prompt logprobs.")
        records: list[TokenLogprob | None] = [None]
        for token_id, entries in zip(prompt_ids[1:], data[1:], strict=True):
            entries = entries or {}
            chosen = entries[str(token_id)]
            ranked = sorted(((int(i), e) for i, e in entries.items()), key=lambda item: item[1]["rank"])
            top = tuple(
                TopLogprob(i, self.tokenizer.token_text(i), e["logprob"])
                for i, e in ranked
                if e["rank"] <= (params.prompt_logprobs or 0)
            )
            records.append(TokenLogprob(token_id, self.tokenizer.token_text(token_id), chosen["logprob"], top))
        return records


@contextmanager
def _read_from_worker() -> Iterator[None]:
    """A worker's answer that is JSON but not what vLLM sends is the worker's fault, not the client's: a 502."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(f"The model worker's answer is not a vLLM completion ({exc!r}).") from exc


def _token_id(token: str) -> int:
    return int(token.removeprefix(_TOKEN_ID_PREFIX))


def _finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    raise UpstreamError(f"The model worker ended the request with `{reason}`.")
