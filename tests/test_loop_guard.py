"""relay.loop_guard's control of the pace (a controlled clock, the lag given tick by tick: exact), and a real event
loop that really lags, paced, refusing on arrival."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from relay import admission, loop_guard
from relay.admission import Gate, Refused, Waiter
from relay.loop_guard import LoopGuard


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


def _guard(target_s: float = 0.01, max_inflight: int | None = None) -> tuple[Gate, LoopGuard, _Clock]:
    gate = Gate(max_inflight, 1.0)
    guard = LoopGuard(gate, target_s)
    clock = _Clock()
    guard._loop = clock  # the controller reads only the loop's time
    return gate, guard, clock


def _ticks(guard: LoopGuard, clock: _Clock, lag: float, n: int) -> None:
    for _ in range(n):
        clock.now += loop_guard.TICK_S + lag
        guard.control(lag, loop_guard.TICK_S + lag)


def _window(guard: LoopGuard, clock: _Clock, lag: float, late: float | None = None, n_late: int = 2) -> None:
    """Ticks `lag` late (the first `n_late` of them `late`, if given) until the window they fall in is judged."""
    end = guard._window_end
    _ticks(guard, clock, late if late is not None else lag, n_late if late is not None else 1)
    while guard._window_end == end and guard.gate.paced:
        _ticks(guard, clock, lag, 1)


def test_a_loop_that_keeps_up_is_never_paced():
    async def main() -> None:
        gate, guard, clock = _guard()
        _ticks(guard, clock, 0.009, 400)  # busy, a tick up to 9 ms late, for two seconds
        assert not gate.paced and isinstance(gate.enter(1, 1), admission._Tenant)

    asyncio.run(main())


def test_a_late_tick_paces_at_what_the_loop_has_shown_it_can_do():
    async def main() -> None:
        gate, guard, clock = _guard()
        guard.start_rate, guard.capacity = 1800.0, 1500.0
        _ticks(guard, clock, 0.02, 1)
        assert gate.paced and gate.pace == pytest.approx(0.9 * 1800.0)
        gate.set_pace(None)
        guard.start_rate, guard.capacity = 3.0, None  # a lull (a collector's pause): no measure yet, the prior
        _ticks(guard, clock, 0.02, 1)
        assert gate.pace == loop_guard.PRIOR_CAPACITY

    asyncio.run(main())


def test_the_pace_follows_each_windows_second_worst_tick():
    async def main() -> None:
        gate, guard, clock = _guard()
        guard.capacity = 1000.0
        _ticks(guard, clock, 0.02, 1)
        assert gate.pace == pytest.approx(1000.0)
        _window(guard, clock, 0.0, late=0.011)  # two late ticks in a window
        pace = 1000.0 * loop_guard.DECREASE
        assert gate.pace == pytest.approx(pace)
        for _ in range(300):  # requests held back by the pace all along
            gate.enter(1, 1)
        _window(guard, clock, 0.006, late=0.05, n_late=1)  # one late tick: a pause, not overload
        pace *= loop_guard.INCREASE
        assert gate.pace == pytest.approx(pace)
        _window(guard, clock, 0.001)  # plenty of room
        pace *= loop_guard.INCREASE_FAST
        assert gate.pace == pytest.approx(pace)
        gate.set_pace(None)
        assert gate.waiting == 0
        _ticks(guard, clock, 0.02, 1)
        for _ in range(40):
            _window(guard, clock, 0.05)  # persistently late: down to a tenth of the measured capacity, no further
        assert gate.pace == pytest.approx(100.0)

    asyncio.run(main())


def test_pacing_ends_when_nobody_waits_and_the_loop_keeps_up():
    async def main() -> None:
        gate, guard, clock = _guard()
        guard.capacity = 1000.0
        _ticks(guard, clock, 0.02, 1)
        _window(guard, clock, 0.004)  # a window with no late tick and nobody waiting
        assert not gate.paced and math.isinf(gate.pace)

    asyncio.run(main())


def test_requests_waiting_for_a_fixed_limits_slots_do_not_keep_the_pace_on():
    """RELAY_MAX_INFLIGHT=2 and a pause: the pace starts, but what holds the waiting requests back is the limit, not
    the pace, so the pace neither climbs without end nor stays on."""
    async def main() -> None:
        gate, guard, clock = _guard(max_inflight=2)
        guard.capacity, gate.completion_rate = 1000.0, 100.0
        held = [gate.enter(1, 1) for _ in range(2)]
        waiting = [gate.enter(1, 1) for _ in range(3)]
        assert all(isinstance(w, Waiter) for w in waiting)
        _ticks(guard, clock, 0.02, 1)
        assert gate.paced
        _window(guard, clock, 0.001)
        assert not gate.paced and gate.pace == math.inf
        for token in held:
            gate.release(token)
        assert sum(w.future.done() for w in waiting) == 2

    asyncio.run(main())


def test_a_waiter_cancelled_before_its_cleanup_runs_is_passed_over():
    """Its client left: the task is cancelled (its future with it at once), and the tokens come before the task runs
    its cleanup. The next waiter starts; nothing leaks."""
    async def main() -> tuple:
        gate = Gate(None, 5.0)
        gate.set_pace(1000.0)
        gone = asyncio.create_task(gate.acquire(1, 1))
        await asyncio.sleep(0)
        other = asyncio.create_task(gate.acquire(2, 1))
        await asyncio.sleep(0)
        gone.cancel()
        gate.refill(0.001)  # one token
        await asyncio.gather(gone, return_exceptions=True)
        gate.release(await asyncio.wait_for(other, 1))
        gate.set_pace(None)
        return gate.inflight, gate.waiting, gate._tenants, gate._queued, gate._queued_weight, gate._active_weight

    assert asyncio.run(main()) == (0, 0, {}, {}, 0, 0)


def test_a_lagging_loop_is_paced_and_refuses_on_arrival_without_waiting_out_the_timeout():
    """A real loop made to lag 20-30 ms by a callback that hogs it, and 2,000 requests arriving at once: some start,
    the queue takes what it can start in time, the rest are refused at once (not after RELAY_QUEUE_TIMEOUT_MS);
    once the hog stops, pacing ends."""
    async def main() -> tuple[bool, int, int, float, bool]:
        gate = Gate(None, 2.0)
        guard = LoopGuard(gate, 0.01)
        guard.start()
        stop = asyncio.Event()

        async def hog() -> None:
            while not stop.is_set():
                until = time.perf_counter() + 0.025
                while time.perf_counter() < until:
                    pass
                await asyncio.sleep(0.002)

        hogging = asyncio.create_task(hog())
        await asyncio.sleep(0.3)
        paced = gate.paced
        t0 = time.perf_counter()
        outcomes = [gate.refusal(1, 1) or gate.enter(1, 1) for _ in range(2000)]
        decided_s = time.perf_counter() - t0
        refused = sum(isinstance(o, Refused) for o in outcomes)
        waiting = [o for o in outcomes if isinstance(o, Waiter)]
        stop.set()
        await hogging
        granted = await asyncio.gather(*(gate.wait(w) for w in waiting), return_exceptions=True)
        for token in [*granted, *(o for o in outcomes if isinstance(o, admission._Tenant))]:
            if isinstance(token, admission._Tenant):
                gate.release(token)
        for _ in range(100):  # pacing ends in the first window in which the loop keeps up
            if not gate.paced:
                break
            await asyncio.sleep(0.05)
        guard.stop()
        return paced, refused, len(waiting), decided_s, gate.paced

    paced, refused, waited, decided_s, still_paced = asyncio.run(main())
    assert paced and refused > 1000 and waited > 0 and decided_s < 0.5
    assert not still_paced
