"""Replica choice, affinity and failover against a scripted health probe."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from models.errors import EngineUnavailableError
from models.replicas import HealthProbe, HealthProblem, Replica, ReplicaSet, ReplicaUnreachableError, affinity

URLS = ["http://a:1", "http://b:1", "http://c:1"]


def health_probe(down: set[str], late: set[str] | None = None) -> HealthProbe:
    """Replicas in ``down`` refuse their checks, those in ``late`` answer them too late."""

    async def probe(url: str, timeout: float) -> HealthProblem | None:
        replica = url.removesuffix("/health")
        if replica in down:
            return HealthProblem("refused")
        return HealthProblem("TimeoutError()", late=True) if replica in (late or set()) else None

    return probe


async def replica_set(down: set[str] | None = None) -> ReplicaSet:
    replicas = ReplicaSet("m", URLS, health_probe(down or set()))
    await replicas.check(timeout=1)
    return replicas


async def test_health_checks_take_replicas_out_and_bring_them_back():
    down = {"http://b:1"}
    replicas = ReplicaSet("m", URLS, health_probe(down))
    await replicas.check(timeout=1)
    assert [r.healthy for r in replicas.replicas] == [True, False, True]
    down.clear()
    await replicas.check(timeout=1)
    assert all(r.healthy for r in replicas.replicas)


async def test_a_healthy_replica_is_taken_out_only_after_consecutive_failed_checks():
    late: set[str] = set()
    replicas = ReplicaSet("m", URLS, health_probe(set(), late), failures_to_mark_down=3)
    await replicas.check(timeout=1)
    late.add("http://a:1")
    for _ in range(2):
        await replicas.check(timeout=1)
    assert replicas.replicas[0].healthy, "two late answers from a busy worker keep it serving"
    late.clear()
    await replicas.check(timeout=1)
    late.add("http://a:1")
    for _ in range(2):
        await replicas.check(timeout=1)
    assert replicas.replicas[0].healthy, "a success in between starts the count again"
    await replicas.check(timeout=1)
    assert not replicas.replicas[0].healthy


async def test_unrelated_calls_go_to_the_least_loaded_replica():
    replicas = await replica_set()
    replicas.replicas[0].in_flight, replicas.replicas[1].in_flight, replicas.replicas[2].in_flight = 3, 1, 2
    assert replicas.pick().url == "http://b:1"


async def test_calls_with_one_affinity_key_share_a_replica():
    replicas = await replica_set()
    chosen: list[str] = []

    async def record(replica: Replica) -> None:
        chosen.append(replica.url)
        await asyncio.sleep(0)

    with affinity("request-1"):
        for _ in range(5):
            replicas.replicas[len(chosen) % 3].in_flight += 1  # load shifts; the binding holds
            await replicas.call(record)
    assert len(set(chosen)) == 1


async def test_concurrent_requests_spread_over_replicas():
    replicas = await replica_set()
    chosen: Counter[str] = Counter()

    async def slow(replica: Replica) -> None:
        chosen[replica.url] += 1
        await asyncio.sleep(0.01)

    async def request(key: str) -> None:
        with affinity(key):
            await replicas.call(slow)

    await asyncio.gather(*(request(f"r{i}") for i in range(9)))
    assert chosen == {url: 3 for url in URLS}


async def test_unreachable_replica_is_retried_once_elsewhere_and_marked_down():
    replicas = await replica_set()
    seen: list[str] = []

    async def flaky(replica: Replica) -> str:
        seen.append(replica.url)
        if replica.url == "http://a:1":
            raise ReplicaUnreachableError("connection refused")
        return replica.url

    with affinity("k"):
        replicas.pick("k")  # binds k to a (all idle: the first)
        assert await replicas.call(flaky) != "http://a:1"
        assert await replicas.call(flaky) == seen[-1]  # rebound to the replica that worked
    assert seen[0] == "http://a:1" and not replicas.replicas[0].healthy


async def test_non_idempotent_calls_are_not_retried():
    replicas = await replica_set()
    calls = 0

    async def dead(replica: Replica) -> None:
        nonlocal calls
        calls += 1
        raise ReplicaUnreachableError("reset")

    with pytest.raises(EngineUnavailableError):
        await replicas.call(dead, idempotent=False)
    assert calls == 1


async def test_all_replicas_down_is_a_503():
    replicas = await replica_set(down=set(URLS))

    async def never(replica: Replica) -> None:
        raise AssertionError("no replica should be called")

    with pytest.raises(EngineUnavailableError) as info:
        await replicas.call(never)
    assert info.value.status_code == 503


async def test_streams_fail_over_only_before_their_first_item():
    replicas = await replica_set()

    async def dies_after_one(replica: Replica):
        yield replica.url
        raise ReplicaUnreachableError("reset mid-stream")

    items = []
    with pytest.raises(EngineUnavailableError):
        async for item in replicas.stream(dies_after_one):
            items.append(item)
    assert len(items) == 1

    async def refuses_first(replica: Replica):
        if replica is replicas.replicas[1]:
            raise ReplicaUnreachableError("refused")
        yield replica.url

    replicas.replicas[1].healthy = True
    replicas.replicas[0].in_flight = replicas.replicas[2].in_flight = 5
    assert [item async for item in replicas.stream(refuses_first)] in (["http://a:1"], ["http://c:1"])


async def test_a_stable_key_reaches_the_same_replica_from_every_gateway_process():
    first = await replica_set()
    second = ReplicaSet("m", list(reversed(URLS)), health_probe(set()))  # another process, its own order and load
    await second.check(timeout=1)
    second.replicas[0].in_flight = 5
    keys = [f"trie-{i}" for i in range(60)]
    chosen = [first.pick(key, stable=True).url for key in keys]
    assert chosen == [second.pick(key, stable=True).url for key in keys]
    assert set(Counter(chosen)) == set(URLS), "keys spread over every replica"
    victim = first.pick("trie-0", stable=True)
    moved = first.pick("trie-0", stable=True, exclude=victim)
    assert moved is not victim
    untouched = [key for key, url in zip(keys, chosen, strict=True) if url != victim.url]
    victim.healthy = False  # only the keys of a replica that is down move
    assert all(
        first.pick(key, stable=True).url == url for key, url in zip(keys, chosen, strict=True) if key in untouched
    )


async def test_with_no_healthy_replica_calls_go_to_those_only_late_to_answer_checks_not_to_dead_ones():
    down, late = {"http://a:1"}, {"http://b:1", "http://c:1"}
    replicas = ReplicaSet("m", URLS, health_probe(down, late), failures_to_mark_down=1)
    await replicas.check(timeout=1)
    assert not any(replica.healthy for replica in replicas.replicas)
    chosen = {replicas.pick().url for _ in range(3)} | {replicas.pick(f"k{i}", stable=True).url for i in range(20)}
    assert chosen <= late, "a busy replica serves, slowly, rather than every request failing at once"
    replicas.mark_down(replicas.replicas[1], ReplicaUnreachableError("reset"))  # a call found it dead
    assert replicas.pick().url == "http://c:1"
    replicas.mark_down(replicas.replicas[2], ReplicaUnreachableError("reset"))
    with pytest.raises(EngineUnavailableError):
        replicas.pick()
    late.clear()
    await replicas.check(timeout=1)
    assert replicas.pick().url in {"http://b:1", "http://c:1"} and not replicas.replicas[1].late
