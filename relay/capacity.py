"""RELAY_MAX_INFLIGHT=auto (the default): the in-flight limit from the process's own measurements.

A gateway process is bound by its event loop's CPU, and that is spent per request (parsing, policy, the
upstream call's I/O, logging), not per second a request waits on its upstream. So the limit follows Little's
law: limit = (requests/s the loop can take at TARGET_BUSY of its time) × (how long a request holds its slot).
The first factor is TARGET_BUSY / (loop CPU seconds per request), measured in the seconds when the limit was
what held requests back (some waited) and nothing was refused (refusals cost CPU too and would make requests
look dearer; a lightly loaded loop spreads its fixed chores over few requests and makes them look dearer too);
the second is the mean time a request holds its slot. Two guards hold where that cannot be measured: a loop
that is SATURATED lowers the limit by a fifth each second, and one that is nearly IDLE while requests waited or
were refused raises it by a quarter (and forgets the CPU figure, evidently stale) — behind long streams the loop
is seldom busy enough to measure, and that is what lets the limit climb to hundreds.
Behind a 50 ms upstream that gives a limit of about 16 on a two-core machine; behind streams of several
seconds, hundreds. TARGET_BUSY leaves the rest of the loop for refusing what exceeds the limit: refusals at
8× capacity took about another 20% in bench/overload_bench.py, and admitted requests stayed as fast."""

from __future__ import annotations

import logging
import math
import time

from relay.admission import Slots
from relay.metrics import INFLIGHT_LIMIT

log = logging.getLogger("relay.capacity")

TARGET_BUSY = 0.35  # of the event loop's time, spent on admitted requests
START, FLOOR, CEILING = 64, 8, 1024  # the limit before anything is measured, and its bounds
MIN_BUSY = TARGET_BUSY / 2  # and at least this busy: at a few requests a second its chores doubled their cost
SATURATED, IDLE = 0.8, 0.1  # of the loop's time: the guards' thresholds
SMOOTHING = 0.5  # weight of the newest second in both averages


class Capacity:
    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.cpu_per_request: float | None = None  # loop CPU seconds per finished request
        self.hold_s: float | None = None  # mean time a request holds its slot
        self._cpu, self._wall = time.thread_time(), time.monotonic()
        slots.limit = START
        INFLIGHT_LIMIT.set(START)

    async def measure(self) -> None:
        """Once a second, on the event loop (thread_time is the calling thread's: the loop's)."""
        (cpu, self._cpu), (wall, self._wall) = (self._cpu, time.thread_time()), (self._wall, time.monotonic())
        busy = (self._cpu - cpu) / max(self._wall - wall, 1e-3)  # the loop's share of the time it was busy
        finished, held_s, waited, refused = self.slots.window()
        if finished and waited and not refused and busy >= MIN_BUSY:
            self.cpu_per_request = _smooth(self.cpu_per_request, (self._cpu - cpu) / finished)
        if finished:
            self.hold_s = _smooth(self.hold_s, held_s / finished)
        limit = self.slots.limit
        if self.cpu_per_request is not None and self.hold_s is not None:
            limit = round(TARGET_BUSY / self.cpu_per_request * self.hold_s)
        if busy >= SATURATED:
            limit = min(limit, int(self.slots.limit * 0.8))
        elif busy < IDLE and (waited or refused):
            limit = max(limit, math.ceil(self.slots.limit * 1.25))
            self.cpu_per_request = None
        limit = max(FLOOR, min(CEILING, limit))
        if limit != self.slots.limit:
            log.debug("in-flight limit %d -> %d (%s s of loop CPU and %s s in flight per request, loop %.0f%% busy)",
                      self.slots.limit, limit, self.cpu_per_request, self.hold_s, busy * 100)
            self.slots.set_limit(limit)
            INFLIGHT_LIMIT.set(limit)


def _smooth(average: float | None, sample: float) -> float:
    return sample if average is None else (1 - SMOOTHING) * average + SMOOTHING * sample
