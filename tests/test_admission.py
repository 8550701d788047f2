"""relay.admission's slots (FCFS, fair shares by priority, bounded waits) and relay.capacity's measured limit, on
a real event loop with no server: the orders and counts here are exact."""

from __future__ import annotations

import asyncio

import pytest

from relay import capacity
from relay.admission import Refused, Slots, retry_headers


async def _granted(slots: Slots, tenant: int, weight: int, order: list[str], name: str):
    token = await slots.acquire(tenant, weight)
    order.append(name)
    return token


def test_waiting_requests_are_served_first_come_first_served():
    async def main() -> list[str]:
        slots = Slots(1, 5.0)
        slots.rate = 100.0  # measured: 250 may wait (half the timeout's worth)
        first = await slots.acquire(1, 1)
        order: list[str] = []
        waiting = []
        for name in "abc":
            waiting.append(asyncio.create_task(_granted(slots, 1, 1, order, name)))
            await asyncio.sleep(0)
        for task in waiting:
            token = first
            slots.release(token)
            first = await task
        slots.release(first)
        return order

    assert asyncio.run(main()) == ["a", "b", "c"]


def test_a_tenant_below_its_share_goes_before_an_earlier_request_of_one_above_it():
    async def main() -> list[str]:
        slots = Slots(2, 5.0)
        bulk = [await slots.acquire(1, 1), await slots.acquire(1, 1)]
        order: list[str] = []
        late_bulk = asyncio.create_task(_granted(slots, 1, 1, order, "bulk"))
        await asyncio.sleep(0)
        quiet = asyncio.create_task(_granted(slots, 2, 1, order, "quiet"))
        await asyncio.sleep(0)
        slots.release(bulk[0])  # bulk still holds 1 = its share of 2: the quiet tenant's request is next
        await asyncio.sleep(0)
        slots.release(bulk[1])
        for token in await asyncio.gather(late_bulk, quiet):
            slots.release(token)
        assert slots.inflight == 0 and slots.waiting == 0
        return order

    assert asyncio.run(main()) == ["quiet", "bulk"]


def test_shares_follow_priority():
    """Limit 4, priorities 3 and 1, both with waiters: freed slots go 3:1 once each holds its share."""
    async def main() -> dict[int, int]:
        slots = Slots(4, 5.0)
        held = [await slots.acquire(1, 1) for _ in range(4)]  # tenant 1 (priority 1) took every slot
        order: list[str] = []
        tasks = [asyncio.create_task(_granted(slots, 1, 1, order, "low")) for _ in range(4)]
        tasks += [asyncio.create_task(_granted(slots, 2, 3, order, "high")) for _ in range(3)]
        await asyncio.sleep(0)
        for token in held:  # the four old requests finish
            slots.release(token)
        await asyncio.sleep(0)
        counts = {1: slots._tenants[1].inflight, 2: slots._tenants[2].inflight}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return counts

    assert asyncio.run(main()) == {1: 1, 2: 3}


def test_a_tenant_alone_cannot_fill_the_reserve():
    """Limit 16: one tenant's burst gets 14 slots (the last eighth is kept), a newcomer gets one at once; the burst
    gets more only while fewer than 14 are in flight in all."""
    async def main() -> None:
        slots = Slots(16, 5.0)
        slots.rate = 1000.0
        burst = [await slots.acquire(1, 1) for _ in range(14)]
        queued = asyncio.create_task(slots.acquire(1, 1))
        await asyncio.sleep(0)
        assert (slots.inflight, slots.waiting) == (14, 1)
        newcomer = await asyncio.wait_for(slots.acquire(2, 1), 0.1)
        assert slots.inflight == 15 and not queued.done()
        slots.release(burst.pop())  # 14 in flight with the newcomer's: the reserve is all that is free
        await asyncio.sleep(0)
        assert not queued.done() and slots.inflight == 14
        slots.release(newcomer)
        await asyncio.sleep(0)
        assert queued.done() and slots.inflight == 14
        for token in [*burst, queued.result()]:
            slots.release(token)
        assert (slots.inflight, slots.waiting, slots._tenants) == (0, 0, {})

    asyncio.run(main())


def test_given_up_waiters_do_not_pile_up():
    async def main() -> None:
        slots = Slots(1, 5.0)
        slots.rate = 1000.0
        held = await slots.acquire(1, 1)
        for _ in range(200):
            gone = asyncio.create_task(slots.acquire(1, 1))
            await asyncio.sleep(0)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        assert len(slots._tenants[1].queue) <= 8 and slots.waiting == 0
        slots.release(held)

    asyncio.run(main())


def test_a_full_queue_refuses_at_once_and_a_long_wait_is_refused_at_its_timeout():
    async def main() -> None:
        slots = Slots(1, 0.2)
        token = await slots.acquire(1, 1)
        waiter = asyncio.create_task(slots.acquire(1, 1))  # the queue holds one (the limit, before any rate)
        await asyncio.sleep(0)
        with pytest.raises(Refused) as at_once:
            await slots.acquire(1, 1)
        assert at_once.value.reason == "overloaded"
        with pytest.raises(Refused) as timed_out:
            await waiter
        assert timed_out.value.reason == "queue_timeout" and timed_out.value.retry_after_s > 0
        slots.release(token)
        assert (slots.inflight, slots.waiting, slots._tenants) == (0, 0, {})

    asyncio.run(main())


def test_a_waiter_whose_client_left_gives_its_place_back():
    async def main() -> None:
        slots = Slots(1, 5.0)
        token = await slots.acquire(1, 1)
        gone = asyncio.create_task(slots.acquire(1, 1))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert slots.waiting == 0
        slots.release(token)
        assert (slots.inflight, slots._tenants) == (0, {})
        assert await slots.acquire(2, 1) is not None and slots.inflight == 1

    asyncio.run(main())


def test_retry_headers():
    headers = retry_headers(2.0)
    assert 2 <= int(headers["Retry-After"]) <= 3 and 2000 <= int(headers["retry-after-ms"]) <= 3000
    assert retry_headers(0.01)["Retry-After"] == "1"  # HTTP's whole seconds: never 0


@pytest.fixture
def metered(monkeypatch):
    """Slots, their Capacity, and `second(cpu_s, finished, hold_s, waited, refused)`: one measured second."""
    clock = {"cpu": 0.0, "wall": 0.0}
    monkeypatch.setattr(capacity.time, "thread_time", lambda: clock["cpu"])
    monkeypatch.setattr(capacity.time, "monotonic", lambda: clock["wall"])
    slots = Slots(1, 1.0)
    meter = capacity.Capacity(slots)

    def second(cpu_s: float, finished: int, hold_s: float, waited: int = 5, refused: int = 0) -> int:
        clock["cpu"] += cpu_s
        clock["wall"] += 1.0
        slots._finished, slots._held_s, slots._waited, slots._refused = finished, finished * hold_s, waited, refused
        asyncio.run(meter.measure())
        return slots.limit

    return slots, meter, second


def test_the_measured_limit_is_littles_law_over_the_loops_budget(metered):
    slots, meter, second = metered
    assert slots.limit == capacity.START
    # 2 ms of loop CPU per request, 50 ms per request: 0.35 / 0.002 × 0.05 = 8.75 → 9
    assert second(0.4, 200, 0.05) == 9
    # behind streams of 4 s the same CPU allows hundreds in flight (smoothed: 2.025 s)
    assert second(0.4, 200, 4.0) == round(0.35 / 0.002 * 2.025)
    # a second with refusals (their CPU is not the requests'), an idle loop, or one where the limit held nobody
    # back, leaves the CPU figure alone
    before = meter.cpu_per_request
    second(0.9, 100, 4.0, refused=500)
    second(0.01, 2, 4.0, waited=0)
    second(0.9, 100, 4.0, waited=0)
    assert meter.cpu_per_request == before
    for _ in range(12):  # 1 ms per request: fewer than FLOOR would be in flight, so FLOOR it is
        limit = second(0.4, 400, 0.001)
    assert limit == capacity.FLOOR


def test_the_limit_climbs_behind_long_streams_and_falls_on_a_saturated_loop(metered):
    _, _, second = metered
    # 30 s streams, a loop 5% busy, and requests turned away: 64 → 80 → 100 → … up to the ceiling
    limits = [second(0.05, 2, 30.0, waited=3, refused=10) for _ in range(20)]
    assert limits[:3] == [80, 100, 125] and limits[-1] == capacity.CEILING
    assert second(0.05, 2, 30.0, waited=0) == capacity.CEILING  # no demand beyond it: it stays
    # a saturated loop with nothing measurable (everything refused) comes down a fifth per second
    assert [second(0.95, 2, 30.0, waited=0, refused=500) for _ in range(2)] == [819, 655]
