"""Channel health, shared by every gateway process through Redis: a circuit breaker, and the streak of
refused credentials that auto-disables a channel.

K consecutive retryable failures (connect errors, timeouts, 429, 5xx) cool a channel down for T seconds in
every gateway process; routing skips cooling channels unless nothing else is left. Credentials refused K
times in a row (401, or a 403 whose error code says the key is bad) mean the channel's key is wrong or
revoked: the pipeline then has the channel set to `auto_disabled`. A 403 about one request ("this key may
not use that model") is that request's error and counts for nothing. Without Redis the streaks are counted
per process."""

from __future__ import annotations

import logging
import time
from collections import Counter

from channels.base import Channel
from relay.redis_state import RedisState

log = logging.getLogger("relay.circuit")


class CircuitBreaker:
    def __init__(self, state: RedisState, failures: int = 3, cooldown_s: float = 30.0) -> None:
        self.state = state
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.prefix = state.prefix + "cb:"
        self._failing: set[int] = set()  # channels this process saw fail since their last success
        self._local_refusals: Counter[int] = Counter()  # the credential streak when Redis is away
        self._streak_cleared: dict[int, float] = {}  # when this process last ended a channel's refusal streak

    async def usable(self, channels: list[Channel]) -> list[Channel]:
        """The channels not cooling down, in the same order; all of them if every one is cooling."""
        if len(channels) <= 1 or not self.state.enabled:
            return channels
        keys = [f"{self.prefix}open:{c.config.id}" for c in channels]
        cooling = await self.state.call(lambda: self.state.client.mget(keys))
        if not cooling:
            return channels
        open_ = [c for c, flag in zip(channels, cooling, strict=True) if not flag]
        return open_ or channels

    async def cooling(self, channel_ids: list[int]) -> dict[int, float] | None:
        """Seconds each cooling channel has left (the others are absent); None when Redis cannot say."""
        if not channel_ids:
            return {}

        async def read() -> list[int]:
            pipe = self.state.client.pipeline(transaction=False)
            for cid in channel_ids:
                pipe.pttl(f"{self.prefix}open:{cid}")
            return await pipe.execute()

        ttls = await self.state.call(read)
        if ttls is None:
            return None
        return {cid: ttl / 1000 for cid, ttl in zip(channel_ids, ttls, strict=True) if ttl and ttl > 0}

    async def failed(self, channel: Channel, *, credentials: bool = False) -> bool:
        """Counts a failure; True when this one makes K refusals of the channel's credentials in a row."""
        cid = channel.config.id
        self._failing.add(cid)
        fail_key, auth_key = f"{self.prefix}fail:{cid}", f"{self.prefix}auth:{cid}"

        async def count() -> int:
            pipe = self.state.client.pipeline(transaction=True)
            pipe.incr(fail_key)
            pipe.expire(fail_key, int(self.cooldown_s * 10))
            if credentials:
                pipe.incr(auth_key)
                pipe.expire(auth_key, int(self.cooldown_s * 10))
            counts = await pipe.execute()
            if counts[0] >= self.failures:
                await self.state.client.set(f"{self.prefix}open:{cid}", 1, px=int(self.cooldown_s * 1000))
                await self.state.client.delete(fail_key)
                log.warning("channel %s failed %d times in a row: cooling down for %.0f s", channel.config.name,
                            counts[0], self.cooldown_s)
            return counts[2] if credentials else 0

        refusals = await self.state.call(count)
        if not credentials:
            return False
        if refusals is None:  # Redis away: this process's own count
            self._local_refusals[cid] += 1
            refusals = self._local_refusals[cid]
        return refusals >= self.failures

    async def succeeded(self, channel: Channel) -> None:
        cid = channel.config.id
        if cid in self._failing:  # this process saw the streak: end it now
            self._failing.discard(cid)
            self._local_refusals.pop(cid, None)
            await self.forget(channel)
        elif time.monotonic() - self._streak_cleared.get(cid, 0.0) > 1.0:
            # Another process may be counting refusals of this channel: a success here breaks "in a row" for
            # it too. At most one Redis call per channel per second on the hot path.
            self._streak_cleared[cid] = time.monotonic()
            await self.state.call(lambda: self.state.client.delete(f"{self.prefix}auth:{cid}"))

    async def forget(self, channel: Channel) -> None:
        """Ends the channel's streaks (after a success, or once it was disabled: re-enabled, it starts afresh)."""
        cid = channel.config.id
        self._streak_cleared[cid] = time.monotonic()
        await self.state.call(lambda: self.state.client.delete(f"{self.prefix}fail:{cid}", f"{self.prefix}auth:{cid}"))
