"""Admission control: slots, the FIFO queue, 429 with Retry-After, and nothing leaked however a request ends."""

import asyncio

import pytest

from models.errors import OverloadedError
from server.admission import AdmissionController
from server.config import AdmissionConfig
from server.metrics import Metrics


def controller(in_flight: int = 1, queued: int = 1, timeout: float = 5.0) -> AdmissionController:
    config = AdmissionConfig(max_in_flight_per_model=in_flight, max_queued_per_model=queued, queue_timeout_s=timeout)
    return AdmissionController(config, Metrics())


def sample(admission: AdmissionController, name: str, **labels: str) -> float:
    value = admission.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_until_queued(admission: AdmissionController, model: str, count: int) -> None:
    async with asyncio.timeout(5):
        while sample(admission, "alignd_admission_queued", model=model) != count:
            await asyncio.sleep(0)


async def test_free_slots_admit_at_once_and_each_model_has_its_own():
    admission = controller(in_flight=2, queued=0)
    tickets = [admission.ticket() for _ in range(3)]
    await tickets[0].admit("a")
    await tickets[1].admit("a")
    await tickets[2].admit("b")
    assert sample(admission, "alignd_admission_in_flight", model="a") == 2
    assert sample(admission, "alignd_admission_in_flight", model="b") == 1
    for ticket in tickets:
        ticket.release()
    assert sample(admission, "alignd_admission_in_flight", model="a") == 0


async def test_waiting_requests_get_slots_in_arrival_order():
    admission = controller(in_flight=1, queued=3)
    holder = admission.ticket()
    await holder.admit("m")
    order: list[int] = []

    async def request(i: int) -> None:
        ticket = admission.ticket()
        await ticket.admit("m")
        order.append(i)
        ticket.release()

    waiters = []
    for i in range(3):
        waiters.append(asyncio.create_task(request(i)))
        await wait_until_queued(admission, "m", i + 1)
    holder.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2]
    assert sample(admission, "alignd_admission_wait_seconds_count", model="m") == 4


async def test_a_full_queue_refuses_at_once_with_retry_after():
    admission = controller(in_flight=1, queued=1)
    holder = admission.ticket()
    await holder.admit("m")
    queued = asyncio.create_task(admission.ticket().admit("m"))
    await wait_until_queued(admission, "m", 1)
    with pytest.raises(OverloadedError) as refused:
        await admission.ticket().admit("m")
    assert refused.value.status_code == 429
    assert refused.value.headers["Retry-After"] == "2"  # no service time yet: 1 s each, one request ahead
    assert "1 requests are already waiting" in refused.value.message
    assert sample(admission, "alignd_admission_rejected_total", model="m", reason="queue_full") == 1
    holder.release()
    await queued


async def test_no_queue_refuses_whenever_every_slot_is_taken():
    admission = controller(in_flight=1, queued=0)
    holder = admission.ticket()
    await holder.admit("m")
    with pytest.raises(OverloadedError):
        await admission.ticket().admit("m")
    holder.release()
    await admission.ticket().admit("m")


async def test_a_long_wait_is_refused_and_leaves_the_queue():
    admission = controller(in_flight=1, queued=4, timeout=0.05)
    holder = admission.ticket()
    await holder.admit("m")
    with pytest.raises(OverloadedError) as refused:
        await admission.ticket().admit("m")
    assert "no slot freed within 0.05 s" in refused.value.message
    assert sample(admission, "alignd_admission_queued", model="m") == 0
    assert sample(admission, "alignd_admission_rejected_total", model="m", reason="queue_timeout") == 1


async def test_a_cancelled_waiter_takes_no_slot():
    admission = controller(in_flight=1, queued=1)
    holder = admission.ticket()
    await holder.admit("m")
    waiter = asyncio.create_task(admission.ticket().admit("m"))
    await wait_until_queued(admission, "m", 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert sample(admission, "alignd_admission_queued", model="m") == 0
    holder.release()
    async with asyncio.timeout(1):
        await admission.ticket().admit("m")


async def test_retry_after_follows_observed_service_times():
    admission = controller(in_flight=2, queued=0)
    holders = [admission.ticket(), admission.ticket()]
    for ticket in holders:
        await ticket.admit("m")
    admission.release("m", 9.0)  # as a request that held its slot for 9 s would
    await admission.ticket().admit("m")
    with pytest.raises(OverloadedError) as refused:
        await admission.ticket().admit("m")
    # 9 s per request, two at a time, nobody queued: one slot frees in about 9 / 2 s.
    assert refused.value.retry_after_s == 5


def test_releasing_a_ticket_that_holds_nothing_is_harmless():
    admission = controller()
    ticket = admission.ticket()
    ticket.release()
    ticket.release()
