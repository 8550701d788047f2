"""Token quotas of tenants and keys, reserved before dispatch and settled after (ONE API's
preConsumeQuota/postConsumeQuota): a request is admitted only if its estimate (prompt tokens + its
max_tokens, see relay.tokens) fits in what is left, the estimate is held while it runs, and the difference
to what it really spent is given back. So concurrency cannot overspend a quota by more than one request's
estimate error.

With Redis the counters are shared by every gateway process (one Lua script checks and reserves atomically;
a missing counter is seeded from the database's total). Without Redis each process reserves against the
database's total plus its own pending usage: concurrent processes can then overspend each other's share."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from relay.auth import Principal
from relay.errors import RelayError
from relay.redis_state import RedisState
from relay.usage import UsageRecorder

_TTL_S = 86_400  # an idle counter expires and is seeded again from the database

# KEYS: counters. ARGV: estimate, then per counter (seed, limit), then the TTL. Returns {0, 0} when reserved,
# else the 1-based index of the first counter that has no room and its current value.
_RESERVE = """
local estimate = tonumber(ARGV[1])
local current = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if not value then
    value = ARGV[i * 2]
    redis.call('SET', key, value, 'EX', ARGV[#ARGV])
  end
  current[i] = tonumber(value)
  if current[i] + estimate > tonumber(ARGV[i * 2 + 1]) then return {i, current[i]} end
end
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, estimate)
  redis.call('EXPIRE', key, ARGV[#ARGV])
end
return {0, 0}
"""
# KEYS: counters. ARGV: spent - estimate. A counter that vanished meanwhile is seeded afresh next time.
_SETTLE = """
for _, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, ARGV[1]) end
end
return 0
"""


@dataclass(frozen=True)
class _Scope:
    name: str  # "tenant:3" | "key:7"
    limit: int
    used: int  # the database's total plus this process's pending usage
    label: str  # for the client: "tenant" | "API key"


@dataclass
class Hold:
    scopes: list[_Scope]
    tokens: int
    shared: bool  # held in Redis (else in this process)


class QuotaLedger:
    def __init__(self, state: RedisState, usage: UsageRecorder) -> None:
        self.state = state
        self.usage = usage
        self.prefix = state.prefix + "quota:"
        self._reserve = state.client.register_script(_RESERVE) if state.client is not None else None
        self._settle = state.client.register_script(_SETTLE) if state.client is not None else None
        self._held: Counter[str] = Counter()  # this process's reservations when Redis is away

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

    async def reserve(self, principal: Principal, tokens: int) -> Hold | None:
        """Holds `tokens` against every quota of the request, or refuses it (429 insufficient_quota)."""
        scopes = self._scopes(principal)
        if not scopes:
            return None
        if self._reserve is not None:
            args: list[int] = [tokens]
            for scope in scopes:
                args += [scope.used, scope.limit]
            args.append(_TTL_S)
            result = await self.state.call(lambda: self._reserve(keys=[self.prefix + s.name for s in scopes],
                                                                 args=args))
            if result is not None:
                index, current = int(result[0]), int(result[1])
                if index:
                    raise _refusal(scopes[index - 1], current, tokens)
                return Hold(scopes, tokens, shared=True)
        for scope in scopes:  # Redis off or away: this process's view
            current = scope.used + self._held[scope.name]
            if current + tokens > scope.limit:
                raise _refusal(scope, current, tokens)
        for scope in scopes:
            self._held[scope.name] += tokens
        return Hold(scopes, tokens, shared=False)

    async def settle(self, hold: Hold | None, spent: int) -> None:
        """The request is over: it cost `spent` (already recorded in the usage totals)."""
        if hold is None:
            return
        if not hold.shared:
            for scope in hold.scopes:
                self._held[scope.name] -= hold.tokens
                if self._held[scope.name] <= 0:
                    del self._held[scope.name]
            return
        delta = spent - hold.tokens
        if delta and self._settle is not None:
            await self.state.call(lambda: self._settle(keys=[self.prefix + s.name for s in hold.scopes],
                                                       args=[delta]))


def _refusal(scope: _Scope, current: int, tokens: int) -> RelayError:
    owner = "Your tenant" if scope.label == "tenant" else "This API key"
    if current >= scope.limit:
        message = f"{owner} has used its whole token quota; ask the operator to raise it."
    else:
        message = (f"{owner} has {scope.limit - current} tokens of its quota left, and this request may use up "
                   f"to {tokens} (its prompt plus max_tokens); lower max_tokens or ask the operator to raise the "
                   "quota.")
    return RelayError(429, message, "insufficient_quota", None, "insufficient_quota")
