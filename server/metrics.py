"""Prometheus metrics of one app instance (its own registry: no process globals).

With several gateway processes (``processes``), prometheus_client's multiprocess mode keeps every process's
values in files under ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums them, whichever process answers:
counters and histograms add up, gauges of live processes are summed (the admission bounds, the same in every
process, are reported once). The process collector (memory, CPU) is per process and left out there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """What the gateway served, by route and model."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.shared = MULTIPROCESS_DIR in os.environ
        if not self.shared:
            # process_resident_memory_bytes, CPU seconds, open fds: what a soak test watches.
            ProcessCollector(registry=self.registry)
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
        self.in_flight = Gauge(
            "alignd_requests_in_flight", "Requests being served.", ["route"], registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.loop_tasks = Gauge(
            "alignd_event_loop_tasks", "asyncio tasks alive in the gateway's event loop when /metrics was last "
            "answered (by that process): one that keeps growing is a leak.", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.key_requests = Counter(
            "alignd_key_requests", "Requests by API key (configured keys only: bounded).", ["key", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.key_tokens = Counter(
            "alignd_key_tokens", "Tokens by API key, over every model a request touched.", ["key", "kind"],
            registry=self.registry,
        )  # fmt: skip
        self.methods = Counter(
            "alignd_alignment_requests", "Requests that used an alignment method.", ["method"], registry=self.registry
        )
        self.engine_calls = Histogram(
            "alignd_engine_calls_per_request", "Engine calls one request made, over every model it touched.",
            ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry,
        )  # fmt: skip
        self.nudged_fraction = Histogram(
            "alignd_nudged_token_fraction", "Nudging: the fraction of answer tokens the nudger wrote.",
            ["model"], buckets=(0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0), registry=self.registry,
        )  # fmt: skip
        self.admission_in_flight = Gauge(
            "alignd_admission_in_flight", "Requests holding a slot of a model.", ["model"], registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.admission_queued = Gauge(
            "alignd_admission_queued", "Requests waiting for a slot of a model.", ["model"], registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.admission_wait = Histogram(
            "alignd_admission_wait_seconds", "Time a request waited for its slot.", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.admission_rejected = Counter(
            "alignd_admission_rejected", "Requests refused before any work: queue_full and queue_timeout (429), "
            "work_budget (400).", ["model", "reason"], registry=self.registry,
        )  # fmt: skip
        self.admission_limits = Gauge(
            "alignd_admission_limit", "The configured admission bounds (per gateway process) and per-request "
            "compute budget.", ["limit"], registry=self.registry, multiprocess_mode="max",
        )  # fmt: skip
        self.request_work = Histogram(
            "alignd_request_work", "Compute a request asked for: samples x max_tokens x models, + token-guided work.",
            ["model"],
            buckets=tuple(4**k for k in range(2, 11)), registry=self.registry,
        )  # fmt: skip
        self.decision_steps = Counter(
            "alignd_transfer_q_decision_steps", "Transfer-Q*: decision steps taken.", ["model"], registry=self.registry
        )
        self.genarm_decision_steps = Counter(
            "alignd_genarm_decision_steps", "GenARM: decision steps taken.", ["model"], registry=self.registry
        )

        # What the methods' details report, by (method, field): each answer's value is observed or counted.
        self.detail_metrics: dict[tuple[str, str], Histogram | Counter] = {
            ("nudging", "nudged_token_fraction"): self.nudged_fraction,
            ("transfer_q", "decision_steps"): self.decision_steps,
            ("genarm", "decision_steps"): self.genarm_decision_steps,
        }

    def count_tokens(self, model: str, *, prompt: int, completion: int) -> None:
        self.tokens.labels(model=model, kind="prompt").inc(prompt)
        self.tokens.labels(model=model, kind="completion").inc(completion)

    def record_alignment(
        self, model: str, methods: Iterable[str], engine_calls: int, details: Iterable[Mapping[str, BaseModel]]
    ) -> None:
        """Per request: the methods it used, its engine calls, and what each answer's methods reported."""
        for method in methods:
            self.methods.labels(method=method).inc()
        if engine_calls:
            self.engine_calls.labels(model=model).observe(engine_calls)
        for record in details:
            for (method, name), metric in self.detail_metrics.items():
                value = getattr(record.get(method), name, None)
                if value is None:
                    continue
                if isinstance(metric, Histogram):
                    metric.labels(model=model).observe(value)
                else:
                    metric.labels(model=model).inc(value)

    def render(self) -> bytes:
        if not self.shared:
            return generate_latest(self.registry)
        every_process = CollectorRegistry()
        MultiProcessCollector(every_process)
        return generate_latest(every_process)
