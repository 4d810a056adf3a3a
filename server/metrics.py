"""Prometheus metrics of one app instance (its own registry: no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """What the gateway served, by route and model."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "alignd_requests", "HTTP requests served.", ["route", "model", "status"], registry=self.registry
        )
        self.errors = Counter(
            "alignd_errors", "Error responses, by OpenAI error type.", ["route", "model", "type"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "alignd_request_duration_seconds", "Time from request to the last byte of the response.",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "alignd_time_to_first_token_seconds", "Streaming: time from request to the first content chunk.",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.tokens = Counter(
            "alignd_tokens", "Tokens processed, prompt and completion, across every model a request touched.",
            ["model", "kind"], registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge("alignd_requests_in_flight", "Requests being served.", ["route"], registry=self.registry)

    def count_tokens(self, model: str, *, prompt: int, completion: int) -> None:
        self.tokens.labels(model=model, kind="prompt").inc(prompt)
        self.tokens.labels(model=model, kind="completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
