"""Chaos under load (loadtest/chaos.py) on managed mock replicas: closed-loop clients while the replicas are
SIGKILLed in turn and restarted by the gateway's supervisor. Non-streaming requests all succeed (retried on
the other replica), streams cut by a dead replica end with an error event, nothing hangs, memory stays flat.
`python -m loadtest.chaos --stack vllm-cpu` runs the same on vLLM CPU workers."""

from __future__ import annotations

import asyncio
import json

from loadtest.chaos import chaos, chaos_gateway

ALLOWED = {"plain 200", "plain 429 model_overloaded", "plain 503 engine_unavailable", "stream 200",
           "stream 200 upstream_error", "stream 200 engine_unavailable", "stream 429 model_overloaded",
           "stream 503 engine_unavailable"}  # fmt: skip


def test_replicas_killed_under_load():
    with chaos_gateway("mock") as gateway:
        report = asyncio.run(chaos(gateway, clients=8, duration_s=20, kill_every_s=6))
    print(json.dumps({key: report[key] for key in ("requests", "outcomes", "latency_s", "gateway_rss_mib")}))
    outcomes = report["outcomes"]
    assert set(outcomes) <= ALLOWED, outcomes
    assert outcomes["plain 200"] > 100 and outcomes["stream 200"] > 100
    plain_failures = sum(
        count for label, count in outcomes.items() if label.startswith("plain") and label != "plain 200"
    )
    assert plain_failures <= 0.01 * outcomes["plain 200"]
    assert report["calls_retried_on_another_replica"] > 0, "the killed replicas' plain requests were retried"
    assert len([kill for kill in report["kills"] if kill["pid"]]) >= 2
    killed = {kill["pid"] for kill in report["kills"]}
    assert all(r["healthy"] and r["pid"] not in killed for r in report["replicas_after"]), report["replicas_after"]
    assert report["latency_s"]["max"] < 30
    rss = report["gateway_rss_mib"]
    assert rss["after"] - rss["before"] < 50, rss
