"""The gate every API request of a gateway process passes: it starts now, waits briefly in its tenant's queue, or is
refused on arrival.

Two things can hold a request back, and by default only the first exists:
- the pace (set by relay.loop_guard): while the event loop lags, requests start at a measured rate instead of on
  arrival — the loop's CPU is what a gateway process runs out of;
- RELAY_MAX_INFLIGHT=N: at most N requests in flight. Unset (`auto`), nothing counts requests in flight: one that
  waits on its upstream or streams slowly costs the loop almost nothing, so thousands may be.

A request that cannot start waits in its tenant's queue. The next to start is chosen fairly between tenants, with
the tenant's `priority` as its weight: while paced, by start-time fair queueing (the tenant with the fewest starts
for its weight goes first, so a burst cannot crowd out another tenant's trickle); at the in-flight limit, by
concurrency (the tenant with the fewest requests in flight for its weight), and the last eighth of the slots (the
reserve) is kept for tenants below their share as it would be with one more tenant active, so a tenant alone
cannot fill them, even with minutes-long streams.

A request is refused on arrival, without waiting, when its tenant's queue already holds the tenant's share of what
the queue can start in half of RELAY_QUEUE_TIMEOUT_MS at the rate it drains (the pace, or the measured rate at
which requests in flight finish); the other half is slack for the estimate. That absorbs a burst; once the queue
has not emptied for a second, the overload is no burst and the queue holds only 100 ms of starts, so admitted
requests do not all wait half a second. One that still waits its whole RELAY_QUEUE_TIMEOUT_MS is refused then.
Everything here runs on the event loop; nothing awaits but the waiting request itself."""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field

from backends.wire import errors as wire

_RATE_WINDOW_S = 0.5  # completions are counted over windows this long for the in-flight limit's drain rate
STANDING_S, STANDING_HORIZON_S = 1.0, 0.1  # a queue that has not emptied for STANDING_S holds this much only
TOKENS_S = 0.05  # the pace's tokens pile up to this many seconds' worth at most


@dataclass(slots=True, eq=False)
class Waiter:
    seq: int
    tenant: _Tenant
    future: asyncio.Future[bool]
    gone: bool = False  # gave up (timed out or its client left): skipped when it reaches the head
    timer: asyncio.TimerHandle | None = None  # its queue timeout


@dataclass(slots=True, eq=False)
class _Tenant:
    id: int
    weight: int
    vtime: float  # starts so far divided by weight, on the gate's virtual clock (start-time fair queueing)
    inflight: int = 0
    queue: collections.deque[Waiter] = field(default_factory=collections.deque)
    queued: int = 0  # waiters in `queue` that have not given up


class Refused(Exception):
    """No start: `reason` is what held the request back — "loop_busy" (the pace), "inflight_limit"
    (RELAY_MAX_INFLIGHT) or "queue_timeout" (it waited its whole bound) — and `retry_after_s` an estimate of when a
    retry is likely to start."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Gate:
    def __init__(self, max_inflight: int | None, timeout_s: float) -> None:
        self.max_inflight = None if max_inflight is None else max(1, max_inflight)
        self.timeout_s = max(0.0, timeout_s)
        self.inflight = 0
        self.waiting = 0
        self.started = 0  # requests started so far (relay.loop_guard reads the rate)
        self.refused = 0  # requests refused so far
        # The pace, set by relay.loop_guard: while `paced`, a start takes a token, and tokens come at `pace` a second
        self.paced = False
        self.pace = math.inf
        self.tokens = 0.0
        self._tenants: dict[int, _Tenant] = {}  # tenants with a request in flight or waiting
        self._queued: dict[int, _Tenant] = {}  # those with a request waiting
        self._active_weight = 0
        self._queued_weight = 0  # of the tenants with a request waiting
        self._vclock = 0.0  # the virtual time of the last start: where a tenant joining the queue starts from
        self._seq = 0
        self._queued_since = 0.0  # when the queue last went from empty to not
        self._completed = 0  # in the current rate window
        self._window_start = time.monotonic()
        self.completion_rate: float | None = None  # requests finishing per second, smoothed; None until measured

    # --- the request's side -------------------------------------------------------------------------------

    async def acquire(self, tenant_id: int, weight: int) -> _Tenant:
        """A start (hand the returned token to `release`), or Refused."""
        entered = self.enter(tenant_id, weight)
        return await self.wait(entered) if isinstance(entered, Waiter) else entered

    def refusal(self, tenant_id: int, weight: int) -> Refused | None:
        """The refusal `enter` would give now (counted), without entering: it needs neither the body nor a queue
        place."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            verdict = self._verdict(None, max(1, weight), self._active_weight + max(1, weight))
        else:
            verdict = self._verdict(tenant, tenant.weight, self._active_weight)
        if not isinstance(verdict, Refused):
            return None
        self.refused += 1
        return verdict

    def enter(self, tenant_id: int, weight: int) -> _Tenant | Waiter:
        """A start now (the token for `release`), a place in the queue (to `wait` on), or Refused."""
        tenant = self._tenant(tenant_id, weight)
        verdict = self._verdict(tenant, tenant.weight, self._active_weight)
        if verdict is True:
            if self.paced:
                self.tokens -= 1
            return self._grant(tenant)
        if verdict is not False:
            self._forget_if_idle(tenant)
            self.refused += 1
            raise verdict
        loop = asyncio.get_running_loop()
        self._seq += 1
        waiter = Waiter(self._seq, tenant, loop.create_future())
        if not tenant.queued:
            tenant.vtime = max(tenant.vtime, self._vclock)  # no credit for the time it did not ask
            self._queued[tenant.id] = tenant
            self._queued_weight += tenant.weight
        tenant.queue.append(waiter)
        tenant.queued += 1
        if not self.waiting:
            self._queued_since = time.monotonic()
        self.waiting += 1
        waiter.timer = loop.call_later(self.timeout_s, self._expire, waiter)
        return waiter

    async def wait(self, waiter: Waiter) -> _Tenant:
        future = waiter.future
        try:
            granted = await future
        except asyncio.CancelledError:  # its client went away while it waited
            self.leave(waiter)
            raise
        finally:
            if waiter.timer is not None:
                waiter.timer.cancel()
        if not granted:
            self.refused += 1
            raise Refused("queue_timeout", self.retry_after_s())
        return waiter.tenant

    def leave(self, waiter: Waiter) -> None:
        """A waiter whose request is abandoned: its place is given up, or its start handed on if just granted."""
        future = waiter.future
        if future.done() and not future.cancelled() and future.result():
            self.release(waiter.tenant)
        else:
            self._give_up(waiter)
            if not future.done():
                future.cancel()
        if waiter.timer is not None:
            waiter.timer.cancel()

    def release(self, tenant: _Tenant) -> None:
        """A request has finished."""
        self.inflight -= 1
        tenant.inflight -= 1
        if self.max_inflight is not None:
            self._count_completion()
        self.dispatch()
        self._forget_if_idle(tenant)

    # --- the pace's side (relay.loop_guard) -------------------------------------------------------------------

    def set_pace(self, pace: float | None) -> None:
        """Starts per second from now on; None: no pace, a request starts on arrival (the waiting ones now)."""
        if pace is None:
            self.paced, self.pace, self.tokens = False, math.inf, 0.0
        else:
            if not self.paced:
                self.tokens = 0.0
            self.paced, self.pace = True, pace
        self.dispatch()

    def refill(self, seconds: float) -> None:
        """The pace's tokens for `seconds` more, up to TOKENS_S of them: a tick that comes late still gives what the
        pace promised (the queue's estimates count on it), a long stall does not turn into a burst."""
        if self.paced:
            self.tokens = min(self.tokens + self.pace * seconds, max(1.0, self.pace * TOKENS_S))
            self.dispatch()

    def dispatch(self) -> None:
        """Starts waiting requests while there is room."""
        while self.waiting and self._room():
            waiter = self._pick()
            if waiter is None:
                return
            tenant = waiter.tenant
            tenant.queue.popleft()
            self._leave(waiter)
            if self.paced:
                self.tokens -= 1
            self._grant(tenant)
            waiter.future.set_result(True)

    def drain_rate(self) -> tuple[float, str]:
        """Starts per second the queue can expect, and what holds it to that: the pace ("loop_busy") or the
        in-flight limit ("inflight_limit": the rate requests finish; before that is measured, as if a request took a
        second)."""
        rate, reason = (self.pace, "loop_busy") if self.paced else (math.inf, "")
        limit = self.max_inflight
        if limit is not None and self.inflight >= limit - limit // 8:
            finishing = self.completion_rate or limit
            if finishing < rate:
                rate, reason = finishing, "inflight_limit"
        return (rate, reason) if rate != math.inf else (1000.0, "loop_busy")  # neither holds: about to be served

    def retry_after_s(self) -> float:
        """When the requests ahead are likely started: what is waiting, at the rate the queue drains."""
        return min(60.0, (self.waiting + 1) / max(self.drain_rate()[0], 0.1))

    # --- bookkeeping --------------------------------------------------------------------------------------

    def _verdict(self, tenant: _Tenant | None, weight: int, active_weight: int) -> bool | Refused:
        """True: it may start now; False: it may wait — the queue would start it in time, and its tenant holds less
        than its share of the queue (by weight, among the tenants queueing); Refused: neither. `tenant` None: one not
        yet active."""
        queued, inflight = (tenant.queued, tenant.inflight) if tenant is not None else (0, 0)
        if self._room() and self._may_take(inflight, weight) and (
                not self.waiting or not queued and self._jumps(inflight, weight, active_weight)):
            return True
        rate, reason = self.drain_rate()
        room = rate * self._horizon_s()  # what the queue can start in time
        share = room * weight / (self._queued_weight + (0 if queued else weight))
        # within its share of the queue; or, while the queue has room, its first request (a share under one: a crowd)
        if self.timeout_s > 0 and (queued + 1 <= share or not queued and self.waiting < max(1.0, room)):
            return False
        return Refused(reason, min(60.0, (self.waiting + 1) / max(rate, 0.1)))

    def _horizon_s(self) -> float:
        """How far ahead the queue may fill: half of RELAY_QUEUE_TIMEOUT_MS for a burst; once requests have waited
        without a break for STANDING_S, the overload is no burst, and a longer queue would only make every admitted
        request wait longer (CoDel's observation), so STANDING_HORIZON_S."""
        horizon = self.timeout_s / 2
        if self.waiting and time.monotonic() - self._queued_since > STANDING_S:
            return min(horizon, STANDING_HORIZON_S)
        return horizon

    def _room(self) -> bool:
        return (not self.paced or self.tokens >= 1) and (self.max_inflight is None or self.inflight < self.max_inflight)

    def _may_take(self, inflight: int, weight: int) -> bool:
        """At the in-flight limit's last eighth (the reserve), only a tenant below its share as it would be with
        one more tenant active may start."""
        limit = self.max_inflight
        if limit is None or self.inflight < limit - limit // 8:
            return True
        return inflight < limit * weight / (self._active_weight + 1)

    def _jumps(self, inflight: int, weight: int, active_weight: int) -> bool:
        """Under the in-flight limit, a tenant below its share of it starts before others' waiting requests (they
        wait for slots that tenants above their share hold). Under the pace, nobody jumps: the tokens are the
        waiting requests' first."""
        return not self.paced and self.max_inflight is not None and \
            inflight < self.max_inflight * weight / max(active_weight, 1)

    def _pick(self) -> Waiter | None:
        """The next waiter to start: the fair choice between the tenants' first waiters (see the module's doc)."""
        by_concurrency = not self.paced
        best: Waiter | None = None
        best_key: tuple[float, int] = (math.inf, 0)
        for tenant in list(self._queued.values()):
            queue = tenant.queue
            while queue and (queue[0].gone or queue[0].future.done()):
                # gone, or cancelled by its client's leaving with its own cleanup (`leave`) not yet run
                waiter = queue.popleft()
                if not waiter.gone:
                    self._leave(waiter)
            if not queue or not self._may_take(tenant.inflight, tenant.weight):
                continue
            key = (tenant.inflight / tenant.weight if by_concurrency else tenant.vtime, queue[0].seq)
            if key < best_key:
                best, best_key = queue[0], key
        return best

    def _tenant(self, tenant_id: int, weight: int) -> _Tenant:
        weight = max(1, weight)
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            tenant = self._tenants[tenant_id] = _Tenant(tenant_id, weight, self._vclock)
            self._active_weight += weight
        elif tenant.weight != weight:  # its priority was edited meanwhile
            self._active_weight += weight - tenant.weight
            if tenant.queued:
                self._queued_weight += weight - tenant.weight
            tenant.weight = weight
        return tenant

    def _forget_if_idle(self, tenant: _Tenant) -> None:
        if tenant.inflight == 0 and tenant.queued == 0 and self._tenants.get(tenant.id) is tenant:
            del self._tenants[tenant.id]
            self._active_weight -= tenant.weight

    def _grant(self, tenant: _Tenant) -> _Tenant:
        self.inflight += 1
        self.started += 1
        tenant.inflight += 1
        self._vclock = max(self._vclock, tenant.vtime)
        tenant.vtime += 1 / tenant.weight
        return tenant

    def _count_completion(self) -> None:
        self._completed += 1
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed >= _RATE_WINDOW_S:
            if elapsed <= 4 * _RATE_WINDOW_S:  # a longer window held an idle spell: no measure of the pace
                measured = self._completed / elapsed
                rate = self.completion_rate
                self.completion_rate = measured if rate is None else 0.5 * rate + 0.5 * measured
            self._completed, self._window_start = 0, now

    def _leave(self, waiter: Waiter) -> None:
        waiter.gone = True
        tenant = waiter.tenant
        tenant.queued -= 1
        self.waiting -= 1
        if not tenant.queued and self._queued.pop(tenant.id, None) is not None:
            self._queued_weight -= tenant.weight

    def _give_up(self, waiter: Waiter) -> None:
        if not waiter.gone:
            self._leave(waiter)
        queue = waiter.tenant.queue
        while queue and queue[0].gone:
            queue.popleft()
        if len(queue) > 2 * waiter.tenant.queued + 8:  # given-up waiters further back: drop them now
            waiter.tenant.queue = collections.deque(w for w in queue if not w.gone)
        self._forget_if_idle(waiter.tenant)

    def _expire(self, waiter: Waiter) -> None:
        if not waiter.future.done():
            self._give_up(waiter)
            waiter.future.set_result(False)


def retry_headers(seconds: float) -> dict[str, str]:
    """The gateway's Retry-After headers: `seconds` spread by up to +50%."""
    return wire.retry_headers(seconds, spread=0.5)
