"""Watches the gateway process's event loop and paces new requests while it lags (RELAY_LOOP_LAG_MS).

A gateway process runs out of one thing: its event loop's CPU. Parsing, policies, the upstream call's I/O and the
request log are spent per request; a request waiting on its upstream, or a slow stream between its chunks, costs
nothing. So the guard does not count requests; it measures the loop. Every TICK_S it asks to run again and notes
how late it did: the loop's lag, the wait every ready callback (a new request, a stream's next chunk, a refusal)
has on top of its own work. An idle or busy-but-keeping-up loop lags a millisecond or two; one given more than it
can do lags more and more.

While the lag stays at or under the target, nothing is paced: every request starts on arrival, however many are in
flight. When a tick runs later than the target, the guard paces starts (relay.admission's gate): new requests start
at `pace` a second, in fair order, and wait in their tenant's queue meanwhile (refused on arrival when that queue
would not drain in time). The pace starts at what the loop has shown it can do — the larger of 90% of the recent
start rate and the rate its measured CPU per start allows — and is then set once per WINDOW_S by the window's
second-worst tick (a single late tick is one pause, a collection or a log flush, not overload): over the target, it goes
down by DECREASE (to a tenth of the measured capacity at the least); under it, in a window where the pace held
requests back (they waited and its tokens were spent), up by INCREASE (INCREASE_FAST under half the target); under
half the target with nobody held back, pacing ends. Judging each window this way keeps the loop's lag at the target
for nearly every tick (a per-tick rule would settle where a quarter of them run late), and it is those late ticks
that every request in the process waits out."""

from __future__ import annotations

import asyncio
import math
import time

from relay.admission import Gate
from relay.metrics import LOOP_BUSY, LOOP_LAG, START_RATE_LIMIT

TICK_S = 0.005  # how often the loop's lag is sampled
WINDOW_S = 0.1  # while pacing, the pace is adjusted once per window of this many seconds, on its worst tick
DECREASE, INCREASE, INCREASE_FAST = 0.85, 1.05, 1.25  # the pace's steps per window
PRIOR_CAPACITY = 1000.0  # starts per second a gateway process is taken to manage before its CPU per start is measured
FLOOR = 5.0  # starts per second, or a tenth of the measured capacity: the pace never goes below (requests keep
# trickling in, and show whether the lag was theirs)
RATE_WINDOW_S = 0.05  # the recent start rate is measured over windows this long
CPU_WINDOW_S = 1.0  # and the loop's CPU per start over windows this long
MIN_STARTS_FOR_CPU = 50  # fewer starts in a window say more about the loop's chores than about requests


class LoopGuard:
    def __init__(self, gate: Gate, lag_target_s: float | None) -> None:
        """`lag_target_s` None: measure only, never pace."""
        self.gate = gate
        self.target = lag_target_s
        self.lag = 0.0  # the last tick's
        self.start_rate = 0.0  # starts per second, smoothed over RATE_WINDOW_S windows
        self.capacity: float | None = None  # starts per second the loop's CPU allows, from its CPU per start
        self.busy = 0.0  # the loop's share of the last CPU window spent running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = self._last = 0.0
        self._rate_mark = (0.0, 0)  # (time, starts) at the start of the rate window
        self._cpu_mark = (0.0, 0.0, 0, 0)  # (time, thread CPU, starts, refusals) at the start of the CPU window
        self._window_end = 0.0  # while pacing: when the current window ends, its two worst lags, and whether the
        self._window_lags = (0.0, 0.0)  # pace held requests back in it
        self._window_held = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self._last = now
        self._rate_mark = (now, self.gate.started)
        self._cpu_mark = (now, time.thread_time(), self.gate.started, self.gate.refused)
        START_RATE_LIMIT.set(math.nan)
        self._schedule(now)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        self._due = now + TICK_S
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        try:
            self.lag = lag = max(0.0, now - self._due)
            LOOP_LAG.observe(lag)
            elapsed, self._last = now - self._last, now
            self._measure(now)
            if self.target is not None:
                self.control(lag, elapsed)
        finally:  # whatever went wrong, the guard keeps ticking: a paced gate without it would never refill
            self._schedule(now)

    def control(self, lag: float, elapsed: float) -> None:
        """One tick's step: `lag` is how late it ran, `elapsed` the seconds since the last one."""
        gate = self.gate
        self._window_lags = sorted((*self._window_lags, lag))[-2:]
        # the pace held requests back: they waited, and its tokens were spent (not a fixed in-flight limit)
        self._window_held = self._window_held or gate.waiting > 0 and gate.tokens < 1
        if lag > self.target and not gate.paced:
            # the loop has just fallen behind: pace at what it has shown it can do, a little less
            self._pace(max(0.9 * self.start_rate, self.capacity or PRIOR_CAPACITY))
            self._next_window()
        elif gate.paced and self._loop.time() >= self._window_end:
            # judged by its second-worst tick: one late tick is a single pause (a collection, a flush), not overload
            worst, held = self._window_lags[0], self._window_held
            self._next_window()
            if worst > self.target:
                # Whether its own work made the loop late or something kept it off the CPU (other processes, a
                # container's quota), what it starts must fit what it gets
                self._pace(max(FLOOR, 0.1 * (self.capacity or 0.0), gate.pace * DECREASE))
            elif not held and worst <= self.target / 2:
                self._pace(None)  # the pace held nobody back and the loop kept up: start on arrival again
                return
            elif held:  # the pace held requests back and the loop kept up: more, quickly while it has room to spare
                self._pace(gate.pace * (INCREASE_FAST if worst <= self.target / 2 else INCREASE))
        gate.refill(elapsed)

    def _next_window(self) -> None:
        self._window_lags, self._window_held, self._window_end = (0.0, 0.0), False, self._loop.time() + WINDOW_S

    def _pace(self, pace: float | None) -> None:
        self.gate.set_pace(pace)
        START_RATE_LIMIT.set(math.nan if pace is None else pace)

    def _measure(self, now: float) -> None:
        """The recent start rate, and every CPU_WINDOW_S the loop's busy share and its CPU per start."""
        started, refused = self.gate.started, self.gate.refused
        since, before = self._rate_mark
        if now - since >= RATE_WINDOW_S:
            rate = (started - before) / (now - since)
            self.start_rate = 0.5 * self.start_rate + 0.5 * rate
            self._rate_mark = (now, started)
        since, cpu_before, started_before, refused_before = self._cpu_mark
        if now - since >= CPU_WINDOW_S:
            cpu = time.thread_time()
            self.busy = (cpu - cpu_before) / (now - since)
            LOOP_BUSY.set(self.busy)
            starts = started - started_before
            # a window with refusals spent CPU on them too, which would make requests look dearer
            if starts >= MIN_STARTS_FOR_CPU and refused == refused_before and cpu > cpu_before:
                capacity = starts / (cpu - cpu_before)
                self.capacity = capacity if self.capacity is None else 0.5 * self.capacity + 0.5 * capacity
            self._cpu_mark = (now, cpu, started, refused)
