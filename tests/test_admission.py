"""relay.admission's gate (the in-flight limit: FCFS, fair shares by priority, the reserve; the pace: tokens, start-time
fair queueing, the queue's shares, refusal on arrival), on a real event loop with no server: the orders and counts
here are exact. relay.loop_guard, which sets the pace, is tests/test_loop_guard.py's."""

from __future__ import annotations

import asyncio

import pytest

from relay import admission
from relay.admission import Gate, Refused, Waiter, retry_headers


async def _granted(gate: Gate, tenant: int, weight: int, order: list[str], name: str):
    token = await gate.acquire(tenant, weight)
    order.append(name)
    return token


# --- RELAY_MAX_INFLIGHT=N ------------------------------------------------------------------------------------------

def test_waiting_requests_are_served_first_come_first_served():
    async def main() -> list[str]:
        gate = Gate(1, 5.0)
        gate.completion_rate = 100.0  # measured: 250 may wait (half the timeout's worth)
        first = await gate.acquire(1, 1)
        order: list[str] = []
        waiting = []
        for name in "abc":
            waiting.append(asyncio.create_task(_granted(gate, 1, 1, order, name)))
            await asyncio.sleep(0)
        for task in waiting:
            gate.release(first)
            first = await task
        gate.release(first)
        return order

    assert asyncio.run(main()) == ["a", "b", "c"]


def test_a_tenant_below_its_share_goes_before_an_earlier_request_of_one_above_it():
    async def main() -> list[str]:
        gate = Gate(2, 5.0)
        bulk = [await gate.acquire(1, 1), await gate.acquire(1, 1)]
        order: list[str] = []
        late_bulk = asyncio.create_task(_granted(gate, 1, 1, order, "bulk"))
        await asyncio.sleep(0)
        quiet = asyncio.create_task(_granted(gate, 2, 1, order, "quiet"))
        await asyncio.sleep(0)
        gate.release(bulk[0])  # bulk still holds 1 = its share of 2: the quiet tenant's request is next
        await asyncio.sleep(0)
        gate.release(bulk[1])
        for token in await asyncio.gather(late_bulk, quiet):
            gate.release(token)
        assert gate.inflight == 0 and gate.waiting == 0
        return order

    assert asyncio.run(main()) == ["quiet", "bulk"]


def test_shares_follow_priority():
    """Limit 4, priorities 3 and 1, both with waiters: freed slots go 3:1 once each holds its share."""
    async def main() -> dict[int, int]:
        gate = Gate(4, 5.0)
        held = [await gate.acquire(1, 1) for _ in range(4)]  # tenant 1 (priority 1) took every slot
        order: list[str] = []
        tasks = [asyncio.create_task(_granted(gate, 1, 1, order, "low")) for _ in range(4)]
        tasks += [asyncio.create_task(_granted(gate, 2, 3, order, "high")) for _ in range(3)]
        await asyncio.sleep(0)
        for token in held:  # the four old requests finish
            gate.release(token)
        await asyncio.sleep(0)
        counts = {1: gate._tenants[1].inflight, 2: gate._tenants[2].inflight}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return counts

    assert asyncio.run(main()) == {1: 1, 2: 3}


def test_a_tenant_alone_cannot_fill_the_reserve():
    """Limit 16: one tenant's burst gets 14 slots (the last eighth is kept), a newcomer gets one at once; the burst
    gets more only while fewer than 14 are in flight in all."""
    async def main() -> None:
        gate = Gate(16, 5.0)
        gate.completion_rate = 1000.0
        burst = [await gate.acquire(1, 1) for _ in range(14)]
        queued = asyncio.create_task(gate.acquire(1, 1))
        await asyncio.sleep(0)
        assert (gate.inflight, gate.waiting) == (14, 1)
        newcomer = await asyncio.wait_for(gate.acquire(2, 1), 0.1)
        assert gate.inflight == 15 and not queued.done()
        gate.release(burst.pop())  # 14 in flight with the newcomer's: the reserve is all that is free
        await asyncio.sleep(0)
        assert not queued.done() and gate.inflight == 14
        gate.release(newcomer)
        await asyncio.sleep(0)
        assert queued.done() and gate.inflight == 14
        for token in [*burst, queued.result()]:
            gate.release(token)
        assert (gate.inflight, gate.waiting, gate._tenants) == (0, 0, {})

    asyncio.run(main())


def test_given_up_waiters_do_not_pile_up():
    async def main() -> None:
        gate = Gate(1, 5.0)
        gate.completion_rate = 1000.0
        held = await gate.acquire(1, 1)
        for _ in range(200):
            gone = asyncio.create_task(gate.acquire(1, 1))
            await asyncio.sleep(0)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
        assert len(gate._tenants[1].queue) <= 8 and gate.waiting == 0 and not gate._queued
        gate.release(held)

    asyncio.run(main())


def test_a_full_queue_refuses_on_arrival_and_a_long_wait_is_refused_at_its_timeout():
    async def main() -> None:
        gate = Gate(1, 0.2)
        token = await gate.acquire(1, 1)
        waiter = asyncio.create_task(gate.acquire(1, 1))  # the queue holds one (1/s before a rate is measured)
        await asyncio.sleep(0)
        assert gate.refusal(1, 1).reason == "inflight_limit"  # what a request arriving now is told, unread
        with pytest.raises(Refused) as at_once:
            await gate.acquire(1, 1)
        assert at_once.value.reason == "inflight_limit" and at_once.value.retry_after_s == pytest.approx(2.0)
        with pytest.raises(Refused) as timed_out:
            await waiter
        assert timed_out.value.reason == "queue_timeout" and timed_out.value.retry_after_s > 0
        assert gate.refused == 3
        gate.release(token)
        assert (gate.inflight, gate.waiting, gate._tenants) == (0, 0, {})

    asyncio.run(main())


def test_a_waiter_whose_client_left_gives_its_place_back():
    async def main() -> None:
        gate = Gate(1, 5.0)
        token = await gate.acquire(1, 1)
        gone = asyncio.create_task(gate.acquire(1, 1))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert gate.waiting == 0
        gate.release(token)
        assert (gate.inflight, gate._tenants) == (0, {})
        assert await gate.acquire(2, 1) is not None and gate.inflight == 1

    asyncio.run(main())


def test_retry_headers():
    headers = retry_headers(2.0)
    assert 2 <= int(headers["Retry-After"]) <= 3 and 2000 <= int(headers["retry-after-ms"]) <= 3000
    assert retry_headers(0.01)["Retry-After"] == "1"  # HTTP's whole seconds: never 0


# --- the default: no in-flight limit, and the pace ------------------------------------------------------------------

def test_unpaced_thousands_start_at_once_whatever_is_in_flight():
    async def main() -> None:
        gate = Gate(None, 0.5)
        tokens = [gate.enter(n % 7, 1) for n in range(5000)]
        assert not any(isinstance(t, Waiter) for t in tokens) and gate.inflight == 5000 and gate.waiting == 0
        for token in tokens:
            gate.release(token)
        assert (gate.inflight, gate._tenants) == (0, {})

    asyncio.run(main())


def test_paced_requests_start_as_tokens_come_and_the_rest_wait_in_order():
    async def main() -> None:
        gate = Gate(None, 5.0)
        gate.set_pace(1000.0)  # 1,000 starts a second; no tokens yet
        entered = [gate.enter(1, 1) for _ in range(80)]
        assert all(isinstance(e, Waiter) for e in entered) and gate.waiting == 80
        gate.refill(0.003)  # 3 tokens
        assert [e.future.done() for e in entered] == [True] * 3 + [False] * 77 and gate.tokens == pytest.approx(0)
        gate.refill(1.0)  # a long stall gives TOKENS_S' worth (50), not a burst of 1,000
        assert [e.future.done() for e in entered] == [True] * 53 + [False] * 27
        gate.set_pace(None)  # the loop keeps up again: everyone waiting starts now
        assert all(e.future.done() for e in entered) and gate.waiting == 0 and gate.inflight == 80

    asyncio.run(main())


def test_paced_starts_are_shared_fairly_between_tenants_by_priority():
    async def main() -> tuple[list[int], list[int]]:
        gate = Gate(None, 60.0)
        gate.set_pace(1000.0)
        bulk = [gate.enter(1, 1) for _ in range(40)]  # a burst first
        quiet = [gate.enter(2, 1) for _ in range(2)]  # two requests of another tenant after it
        gate.refill(0.004)  # 4 starts: the quiet tenant's two are among them, though they came last
        first = [w.tenant.id for w in bulk + quiet if w.future.done()]
        gate.set_pace(None)

        gate = Gate(None, 60.0)
        gate.set_pace(1000.0)
        low = [gate.enter(1, 1) for _ in range(40)]
        high = [gate.enter(2, 3) for _ in range(40)]  # priority 3
        gate.refill(0.008)
        gate.refill(0.008)
        return first, [w.tenant.id for w in low + high if w.future.done()]

    first, started = asyncio.run(main())
    assert sorted(first) == [1, 1, 2, 2]
    assert (started.count(1), started.count(2)) == (4, 12)


def test_a_paced_queue_refuses_on_arrival_what_it_could_not_start_in_time():
    async def main() -> None:
        gate = Gate(None, 1.0)
        gate.set_pace(100.0)  # the queue drains at 100 a second
        waiters = [gate.enter(1, 1) for _ in range(50)]  # half the timeout's worth: 50
        assert all(isinstance(w, Waiter) for w in waiters)
        refused = gate.refusal(1, 1)
        assert refused.reason == "loop_busy" and refused.retry_after_s == pytest.approx(0.51)
        with pytest.raises(Refused):
            gate.enter(1, 1)
        # another tenant's share is half the queue: it may queue, and the first tenant no more until under its half
        assert gate.refusal(2, 1) is None and isinstance(gate.enter(2, 1), Waiter)
        assert gate.refusal(1, 1).reason == "loop_busy"
        gate.set_pace(None)

    asyncio.run(main())


def test_a_crowd_of_tenants_with_one_request_each_does_not_overfill_the_queue():
    async def main() -> tuple[int, int]:
        gate = Gate(None, 1.0)
        gate.set_pace(100.0)  # 50 in half the timeout
        outcomes = [gate.refusal(t, 1) or gate.enter(t, 1) for t in range(1000)]
        waited = sum(isinstance(o, Waiter) for o in outcomes)
        gate.set_pace(None)
        return waited, sum(isinstance(o, Refused) for o in outcomes)

    assert asyncio.run(main()) == (50, 950)


def test_the_queue_is_shared_by_the_tenants_queueing_not_by_all_in_flight():
    """Two hundred tenants each holding a long stream do not shrink the queue of the one tenant that is bursting;
    two tenants bursting share it half and half, and one arriving second still gets its half."""
    async def main() -> tuple[int, int, int]:
        gate = Gate(None, 1.0)
        streams = [gate.enter(t, 1) for t in range(100, 300)]
        gate.set_pace(100.0)
        bursting = sum(isinstance(gate.refusal(1, 1) or gate.enter(1, 1), Waiter) for _ in range(100))
        gate.set_pace(None)
        gate.set_pace(100.0)
        first = sum(isinstance(gate.refusal(1, 1) or gate.enter(1, 1), Waiter) for _ in range(100))
        second = sum(isinstance(gate.refusal(2, 1) or gate.enter(2, 1), Waiter) for _ in range(100))
        gate.set_pace(None)
        for token in streams:
            gate.release(token)
        return bursting, first, second

    assert asyncio.run(main()) == (50, 50, 25)


def test_a_standing_queue_holds_only_a_tenth_of_a_second(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(admission.time, "monotonic", lambda: clock[0])

    async def main() -> tuple[int, int]:
        gate = Gate(None, 1.0)
        gate.set_pace(100.0)
        burst = 0
        while not isinstance(gate.refusal(1, 1), Refused):
            gate.enter(1, 1)
            burst += 1
        clock[0] += admission.STANDING_S + 0.1  # requests have waited without a break since
        gate.refill(0.0)
        standing = gate._horizon_s()
        gate.set_pace(None)
        return burst, round(standing * 100)

    assert asyncio.run(main()) == (50, round(admission.STANDING_HORIZON_S * 100))
