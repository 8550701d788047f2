"""Slots for API requests: at most `limit` in flight per gateway process, a short first-come-first-served wait
for a free one, and a fair share of them per tenant when they are scarce.

A tenant's share is `limit × weight / Σ weights` over the tenants with a request in flight or waiting (weight:
the tenant's `priority`, 1 by default). A freed slot goes to the longest-waiting request of a tenant below its
share; only when no such tenant waits does it go to the longest-waiting request of all. So one tenant's burst
queues behind its own share while another tenant's request takes the next slot, and with a single tenant this is
plain FCFS. The last eighth of the slots (the reserve) is kept for tenants below their share as it would be with
one more tenant active: a tenant alone cannot fill them, so a newcomer finds one free at once even while the
first holds long streams.

The wait is bounded twice: a request gives up after `timeout_s`, and a tenant may queue only its share of what
the process completes in that time (measured), so a request that could not be served in time is refused at
once, without waiting. Everything here runs on the event loop; nothing awaits but the waiting request itself."""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field

from backends.wire import errors as wire

_RATE_WINDOW_S = 0.5  # completions are counted over windows this long for the throughput estimate


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
    inflight: int = 0
    queue: collections.deque[Waiter] = field(default_factory=collections.deque)
    queued: int = 0  # waiters in `queue` that have not given up


class Refused(Exception):
    """No slot: `reason` is "overloaded" (refused at once) or "queue_timeout"; `retry_after_s` is an estimate of
    when a retry is likely to find one."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class Slots:
    def __init__(self, limit: int, timeout_s: float) -> None:
        self.limit = max(1, limit)
        self.timeout_s = max(0.0, timeout_s)
        self.inflight = 0
        self.waiting = 0
        self._tenants: dict[int, _Tenant] = {}  # tenants with a request in flight or waiting
        self._active_weight = 0
        self._seq = 0
        self._completed = 0  # in the current rate window
        self._window_start = time.monotonic()
        self.rate: float | None = None  # completions per second, smoothed; None until measured
        self._finished = 0  # since the last window(): requests done, their slot time, waits, refusals
        self._held_s = 0.0
        self._waited = 0
        self._refused = 0

    # --- the request's side -------------------------------------------------------------------------------

    async def acquire(self, tenant_id: int, weight: int) -> _Tenant:
        """A slot (hand the returned token to `release`), or Refused."""
        entered = self.enter(tenant_id, weight)
        return await self.wait(entered) if isinstance(entered, Waiter) else entered

    def enter(self, tenant_id: int, weight: int) -> _Tenant | Waiter:
        """A slot at once (the token for `release`), a place in the queue (to `wait` on), or Refused."""
        tenant = self._tenant(tenant_id, weight)
        if self._may_take(tenant) and (not self.waiting or not tenant.queued and tenant.inflight < self._share(tenant)):
            return self._grant(tenant)
        if self.timeout_s <= 0 or tenant.queued >= self._queue_allowance(tenant):
            self._forget_if_idle(tenant)
            self._refused += 1
            raise Refused("overloaded", self.retry_after_s())
        loop = asyncio.get_running_loop()
        self._seq += 1
        waiter = Waiter(self._seq, tenant, loop.create_future())
        tenant.queue.append(waiter)
        tenant.queued += 1
        self.waiting += 1
        self._waited += 1
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
            self._refused += 1
            raise Refused("queue_timeout", self.retry_after_s())
        return waiter.tenant

    def leave(self, waiter: Waiter) -> None:
        """A waiter whose request is abandoned: its place is given up, or its slot handed on if just granted."""
        future = waiter.future
        if future.done() and not future.cancelled() and future.result():
            self.release(waiter.tenant)
        else:
            self._give_up(waiter)
            if not future.done():
                future.cancel()
        if waiter.timer is not None:
            waiter.timer.cancel()

    def release(self, tenant: _Tenant, held_s: float = 0.0) -> None:
        """Gives a slot back; `held_s`: how long the request held it (for relay.capacity)."""
        self.inflight -= 1
        tenant.inflight -= 1
        self._finished += 1
        self._held_s += held_s
        self._completed += 1
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed >= _RATE_WINDOW_S:
            if elapsed <= 4 * _RATE_WINDOW_S:  # a longer window held an idle spell: no measure of the pace
                measured = self._completed / elapsed
                self.rate = measured if self.rate is None else 0.5 * self.rate + 0.5 * measured
            self._completed, self._window_start = 0, now
        self._dispatch()
        self._forget_if_idle(tenant)

    def set_limit(self, limit: int) -> None:
        """A new limit; a higher one is handed to waiting requests at once. Above a lower one, requests in flight
        finish, and the next ones wait until fewer than the new limit remain."""
        self.limit = max(1, limit)
        self._dispatch()

    def window(self) -> tuple[int, float, int, int]:
        """Since the last call: requests finished, the seconds they held their slots, requests that had to wait,
        requests refused."""
        out = self._finished, self._held_s, self._waited, self._refused
        self._finished, self._held_s, self._waited, self._refused = 0, 0.0, 0, 0
        return out

    def retry_after_s(self) -> float:
        """When the requests ahead are likely done: what is in flight and waiting, at the measured rate."""
        rate = self.rate or self.limit  # unmeasured: as if a request took a second
        return min(60.0, (self.inflight + self.waiting + 1) / max(rate, 0.1))

    # --- bookkeeping --------------------------------------------------------------------------------------

    def _tenant(self, tenant_id: int, weight: int) -> _Tenant:
        weight = max(1, weight)
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            tenant = self._tenants[tenant_id] = _Tenant(tenant_id, weight)
            self._active_weight += weight
        elif tenant.weight != weight:  # its priority was edited meanwhile
            self._active_weight += weight - tenant.weight
            tenant.weight = weight
        return tenant

    def _forget_if_idle(self, tenant: _Tenant) -> None:
        if tenant.inflight == 0 and tenant.queued == 0 and self._tenants.get(tenant.id) is tenant:
            del self._tenants[tenant.id]
            self._active_weight -= tenant.weight

    def _share(self, tenant: _Tenant) -> float:
        return self.limit * tenant.weight / max(self._active_weight, 1)

    def _may_take(self, tenant: _Tenant) -> bool:
        """A free slot for this tenant now: any but the reserve, which only a tenant below its share as it would
        be with one more tenant active may take."""
        if self.inflight >= self.limit:
            return False
        if self.inflight < self.limit - self.limit // 8:
            return True
        return tenant.inflight < self.limit * tenant.weight / (self._active_weight + 1)

    def _queue_allowance(self, tenant: _Tenant) -> int:
        """How many of a tenant's requests may wait: its share of what the process completes in half of
        `timeout_s` (the limit itself until a rate is measured), at least one. Half: the last of them should not
        time out after all, the refusal would have cost its client the whole wait."""
        served = self.limit if self.rate is None else self.rate * self.timeout_s / 2
        return max(1, math.floor(served * tenant.weight / max(self._active_weight, 1)))

    def _grant(self, tenant: _Tenant) -> _Tenant:
        self.inflight += 1
        tenant.inflight += 1
        return tenant

    def _dispatch(self) -> None:
        while self.inflight < self.limit and self.waiting:
            first = fair = None
            for tenant in self._tenants.values():
                queue = tenant.queue
                while queue and queue[0].gone:
                    queue.popleft()
                if not queue:
                    continue
                head = queue[0]
                if first is None or head.seq < first.seq:
                    first = head
                if tenant.inflight < self._share(tenant) and (fair is None or head.seq < fair.seq):
                    fair = head
            if fair is not None and self._may_take(fair.tenant):
                chosen = fair
            elif first is not None and self.inflight < self.limit - self.limit // 8:
                chosen = first
            else:
                return
            chosen.tenant.queue.popleft()
            self._leave(chosen)
            self._grant(chosen.tenant)
            chosen.future.set_result(True)

    def _leave(self, waiter: Waiter) -> None:
        waiter.gone = True
        waiter.tenant.queued -= 1
        self.waiting -= 1

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
