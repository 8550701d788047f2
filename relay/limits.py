"""Requests-per-minute and tokens-per-minute limits per key and per tenant, shared by every gateway process
through Redis. Each limit is a GCRA bucket (a "theoretical arrival time" per key), checked and updated
atomically by one Lua script: a steady rate with a burst of RELAY_RATE_BURST_S seconds' worth.

Requests are charged when admitted. Tokens are reserved when admitted (the request's estimate: prompt +
max_tokens, see relay.tokens) and settled when the answer's usage is known (the difference is charged or
given back), so concurrent requests cannot all slip in under a tpm limit. Without Redis (off, or away) each
process runs the same buckets in memory: the limits then hold per process, so N processes admit up to N times
the rate."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from relay.auth import Principal
from relay.errors import APIError
from relay.redis_state import RedisState

# KEYS: buckets. ARGV: now_ms, then per bucket (interval_ms, tolerance_ms, cost).
# Refuses when any bucket is ahead of now by more than its tolerance (returns the ms to wait); otherwise
# charges every bucket its cost and returns 0.
_ADMIT = """
local now = tonumber(ARGV[1])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i * 3 - 1])
  local tolerance = tonumber(ARGV[i * 3])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  tats[i] = tat
  if tat - now > tolerance then
    wait = math.max(wait, tat - now - tolerance)
  end
end
-- Redis truncates a Lua number reply to an integer: a wait of 0.3 ms must not come back as 0 ("admitted").
if wait > 0 then return math.ceil(wait) end
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i * 3 - 1])
  local tolerance = tonumber(ARGV[i * 3])
  local new_tat = tats[i] + interval * tonumber(ARGV[i * 3 + 1])
  if new_tat < now then new_tat = now end  -- a refund never banks capacity beyond a full bucket
  redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now + math.min(tolerance, 3600000) + 1000))
end
return 0
"""


@dataclass(frozen=True)
class _Bucket:
    key: str
    per_minute: int
    what: str  # "requests" | "tokens"
    scope: str  # "API key" | "tenant"


class _LocalBuckets:
    """The Lua script's algorithm, for one process, when Redis is not there to share it."""

    def __init__(self) -> None:
        self.tats: dict[str, float] = {}

    def run(self, keys: list[str], args: list[float]) -> float:
        now = args[0]
        if len(self.tats) > 100_000:  # forget buckets that are full again
            self.tats = {k: t for k, t in self.tats.items() if t > now}
        tats = [max(self.tats.get(key, now), now) for key in keys]
        wait = max((tat - now - args[2 + 3 * i] for i, tat in enumerate(tats)), default=0.0)
        if wait > 0:
            return math.ceil(wait)
        for i, key in enumerate(keys):
            self.tats[key] = max(tats[i] + args[1 + 3 * i] * args[3 + 3 * i], now)
        return 0


class RateLimiter:
    def __init__(self, state: RedisState, burst_s: float = 1.0) -> None:
        self.state = state
        self.burst_s = burst_s
        self._script = state.client.register_script(_ADMIT) if state.client is not None else None
        self._local = _LocalBuckets()

    async def _run(self, keys: list[str], args: list[float]) -> float:
        if self._script is not None:
            result = await self.state.call(lambda: self._script(keys=keys, args=args))
            if result is not None:
                return float(result)
        return self._local.run(keys, args)

    def _buckets(self, principal: Principal, what: str) -> list[_Bucket]:
        key, tenant = principal.key, principal.tenant
        limits = [(f"key:{key.id}", key.rpm if what == "requests" else key.tpm, "API key"),
                  (f"tenant:{tenant.id}", tenant.rpm if what == "requests" else tenant.tpm, "tenant")]
        return [_Bucket(f"{self.state.prefix}rl:{what}:{name}", n, what, scope) for name, n, scope in limits if n]

    def _args(self, buckets: list[_Bucket], costs: list[float]) -> list[float]:
        args: list[float] = [time.time() * 1000]
        for bucket, cost in zip(buckets, costs, strict=True):
            interval = 60_000 / bucket.per_minute
            burst = max(1.0, bucket.per_minute * self.burst_s / 60)
            args += [interval, (burst - 1) * interval, cost]
        return args

    @staticmethod
    def applies_to_tokens(principal: Principal) -> bool:
        return bool(principal.key.tpm or principal.tenant.tpm)

    async def admit(self, principal: Principal, tokens: int = 0) -> None:
        """Charge one request and reserve `tokens`; 429 with Retry-After when a request or token rate is
        already exceeded."""
        requests, token_buckets = self._buckets(principal, "requests"), self._buckets(principal, "tokens")
        buckets = requests + token_buckets
        if not buckets:
            return
        costs = [1.0] * len(requests) + [float(tokens)] * len(token_buckets)
        wait_ms = await self._run([b.key for b in buckets], self._args(buckets, costs))
        if not wait_ms:
            return
        retry_s = max(1, math.ceil(float(wait_ms) / 1000))
        limited = ", ".join(f"{b.per_minute} {b.what} per minute for this {b.scope}" for b in buckets)
        raise APIError(429, f"Rate limit reached ({limited}). Retry after {retry_s} s.", "rate_limit_error",
                         None, "rate_limit_exceeded", headers={"Retry-After": str(retry_s)})

    async def settle_tokens(self, principal: Principal, delta: int) -> None:
        """Charge (or give back, when negative) the difference between spent and reserved tokens."""
        buckets = self._buckets(principal, "tokens")
        if not buckets or not delta:
            return
        # Settling never refuses: tolerance is set huge for this call.
        args = self._args(buckets, [float(delta)] * len(buckets))
        for i in range(len(buckets)):
            args[2 + i * 3] = 1e18
        await self._run([b.key for b in buckets], args)
