"""Token quotas of tenants and keys, reserved before dispatch and settled after (ONE API's
preConsumeQuota/postConsumeQuota): a request is admitted only if its estimate (prompt tokens + the completion
tokens it may spend, see relay.tokens) fits in what is left; the estimate is held while it runs and replaced
by what it really spent when it ends. So concurrency cannot overspend a quota by more than the error of the
prompt counts of the requests in flight (relay.tokens).

With Redis, every gateway process shares, per tenant and per key, a counter of spent tokens and a hash of the
holds of requests in flight (each with an expiry, so a process that dies mid-request frees its holds). The
database's total is a floor for the counter on every reservation: a settlement lost to a Redis blip, or
spending served while Redis was away, cannot hide. Without Redis each process reserves against the database's
total plus its own holds: concurrent processes can then overspend each other's share."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

from relay.auth import Principal
from relay.errors import APIError
from relay.redis_state import RedisState
from relay.usage import UsageRecorder

HOLD_TTL_S = 900  # a hold outlives any request the relay serves; a crashed process's holds expire after it
_COUNTER_TTL_S = 86_400  # an idle counter expires and is seeded again from the database

# KEYS: per scope its counter and its holds. ARGV: request id, estimate, now (s), hold ttl (s), counter ttl
# (s), then per scope (database total, limit). Returns {0, 0} when held, else the 1-based index of the first
# scope without room and what it has spent and holds.
_RESERVE = """
local rid, estimate, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local scopes = #KEYS / 2
for i = 1, scopes do
  local counter, holds = KEYS[2 * i - 1], KEYS[2 * i]
  local floor, limit = ARGV[4 + 2 * i], tonumber(ARGV[5 + 2 * i])
  local spent = tonumber(redis.call('GET', counter) or '-1')
  if spent < tonumber(floor) then
    spent = tonumber(floor)
    redis.call('SET', counter, floor)
  end
  local held = 0
  local entries = redis.call('HGETALL', holds)
  for j = 1, #entries, 2 do
    local amount, expires = string.match(entries[j + 1], '(%d+):(%d+)')
    if tonumber(expires) < now then redis.call('HDEL', holds, entries[j]) else held = held + tonumber(amount) end
  end
  if spent + held + estimate > limit then return {i, spent + held} end
end
for i = 1, scopes do
  redis.call('HSET', KEYS[2 * i], rid, ARGV[2] .. ':' .. (now + ttl))
  redis.call('EXPIRE', KEYS[2 * i], ttl)
  redis.call('EXPIRE', KEYS[2 * i - 1], ARGV[5])
end
return {0, 0}
"""
# KEYS: per scope its counter and its holds. ARGV: request id, tokens spent.
_SETTLE = """
for i = 1, #KEYS / 2 do
  redis.call('HDEL', KEYS[2 * i], ARGV[1])
  if redis.call('EXISTS', KEYS[2 * i - 1]) == 1 then redis.call('INCRBY', KEYS[2 * i - 1], ARGV[2]) end
end
return 0
"""


@dataclass(frozen=True)
class _Scope:
    name: str  # "tenant:3" | "key:7"
    limit: int
    spent: int  # the database's total plus this process's pending usage
    label: str  # for the client: "tenant" | "API key"


@dataclass
class Hold:
    scopes: list[_Scope]
    tokens: int
    shared: bool  # held in Redis (else in this process)
    id: str = field(default_factory=lambda: secrets.token_hex(8))


class QuotaLedger:
    def __init__(self, state: RedisState, usage: UsageRecorder) -> None:
        self.state = state
        self.usage = usage
        self.prefix = state.prefix + "quota:"
        self._reserve = state.client.register_script(_RESERVE) if state.client is not None else None
        self._settle = state.client.register_script(_SETTLE) if state.client is not None else None
        self._held: Counter[str] = Counter()  # this process's holds when Redis is away
        self._unsettled: list[tuple[Hold, int]] = []  # settlements Redis missed: retried by retry_settlements
        # Tokens already in this process's usage totals (the floor) but not yet added to the Redis counter by
        # their settlement: left out of the floor meanwhile, or a reservation in between would raise the counter
        # to the floor and the settlement would then add the same tokens a second time.
        self._settling: Counter[str] = Counter()

    @staticmethod
    def applies(principal: Principal) -> bool:
        return principal.tenant.token_quota is not None or principal.key.token_quota is not None

    def _scopes(self, principal: Principal) -> list[_Scope]:
        tenant, key = principal.tenant, principal.key
        scopes = []
        if tenant.token_quota is not None:
            scopes.append(_Scope(f"tenant:{tenant.id}", tenant.token_quota, self.usage.tenant_used(tenant.id),
                                 "tenant"))
        if key.token_quota is not None:
            scopes.append(_Scope(f"key:{key.id}", key.token_quota, self.usage.key_used(key.id), "API key"))
        return scopes

    def _keys(self, scopes: list[_Scope]) -> list[str]:
        return [self.prefix + s.name + suffix for s in scopes for suffix in ("", ":holds")]

    async def reserve(self, principal: Principal, tokens: int) -> Hold | None:
        """Holds `tokens` against every quota of the request, or refuses it (429 insufficient_quota)."""
        scopes = self._scopes(principal)
        if not scopes:
            return None
        hold = Hold(scopes, tokens, shared=True)
        if self._reserve is not None:
            args: list[int | str] = [hold.id, tokens, int(time.time()), HOLD_TTL_S, _COUNTER_TTL_S]
            for scope in scopes:
                args += [scope.spent - self._settling[scope.name], scope.limit]  # the floor
            result = await self.state.call(lambda: self._reserve(keys=self._keys(scopes), args=args))
            if result is not None:
                index, current = int(result[0]), int(result[1])
                if index:
                    raise _refusal(scopes[index - 1], current, tokens)
                return hold
        for scope in scopes:  # Redis off or away: this process's view
            current = scope.spent + self._held[scope.name]
            if current + tokens > scope.limit:
                raise _refusal(scope, current, tokens)
        for scope in scopes:
            self._held[scope.name] += tokens
        hold.shared = False
        return hold

    def spending(self, hold: Hold | None, spent: int) -> None:
        """Called as `spent` enters the usage totals, before `settle` runs (in the same step of the loop)."""
        if hold is not None and hold.shared:
            for scope in hold.scopes:
                self._settling[scope.name] += spent

    async def settle(self, hold: Hold | None, spent: int) -> None:
        """The request is over: it cost `spent` (already recorded in the usage totals, announced by `spending`)."""
        if hold is None:
            return
        if not hold.shared:
            for scope in hold.scopes:
                self._held[scope.name] -= hold.tokens
                if self._held[scope.name] <= 0:
                    del self._held[scope.name]
            return
        if await self._settle_shared(hold, spent) is None:
            self._unsettled.append((hold, spent))  # its hold would otherwise block the quota until it expires
        else:
            self._settled(hold, spent)

    def _settled(self, hold: Hold, spent: int) -> None:
        for scope in hold.scopes:  # the counter has the tokens now
            self._settling[scope.name] -= spent
            if self._settling[scope.name] <= 0:
                del self._settling[scope.name]

    async def _settle_shared(self, hold: Hold, spent: int):
        if self._settle is None:
            return None
        return await self.state.call(lambda: self._settle(keys=self._keys(hold.scopes), args=[hold.id, spent]))

    async def retry_settlements(self) -> None:
        pending, self._unsettled = self._unsettled, []
        for hold, spent in pending:
            if await self._settle_shared(hold, spent) is None:
                self._unsettled.append((hold, spent))
            else:
                self._settled(hold, spent)


def _refusal(scope: _Scope, current: int, tokens: int) -> APIError:
    owner = "Your tenant" if scope.label == "tenant" else "This API key"
    if current >= scope.limit:
        message = f"{owner} has used its whole token quota; ask the operator to raise it."
    else:
        message = (f"{owner} has {scope.limit - current} tokens of its quota left, and this request may use up "
                   f"to {tokens} (its prompt, plus max_tokens when it generates); lower max_tokens, send less, or "
                   "ask the operator to raise the quota.")
    return APIError(429, message, "insufficient_quota", None, "insufficient_quota")
