"""Channel health: a circuit breaker shared through Redis, and auto-disabling channels whose upstream
refuses the relay's credentials.

K consecutive retryable failures (connect errors, timeouts, 429, 5xx) cool a channel down for T seconds in
every gateway process; routing skips cooling channels unless nothing else is left. A 401/403 from a
channel's upstream means its key is wrong or revoked: the channel is set to `auto_disabled` in the database,
with an audit event, until an operator enables it again."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import Engine, update
from sqlmodel import Session

from channels.base import Channel
from relay.models import AuditEvent, utcnow
from relay.models import Channel as ChannelRow
from relay.redis_state import RedisState

log = logging.getLogger("relay.circuit")

PREFIX = "relay:cb:"


class CircuitBreaker:
    def __init__(self, state: RedisState, failures: int = 3, cooldown_s: float = 30.0) -> None:
        self.state = state
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._failing: set[int] = set()  # channels this process saw fail since their last success

    async def usable(self, channels: list[Channel]) -> list[Channel]:
        """The channels not cooling down, in the same order; all of them if every one is cooling."""
        if len(channels) <= 1 or not self.state.enabled:
            return channels
        keys = [f"{PREFIX}open:{c.config.id}" for c in channels]
        cooling = await self.state.call(lambda: self.state.client.mget(keys))
        if not cooling:
            return channels
        open_ = [c for c, flag in zip(channels, cooling, strict=True) if not flag]
        return open_ or channels

    async def failed(self, channel: Channel) -> None:
        cid = channel.config.id
        self._failing.add(cid)

        async def count() -> int:
            pipe = self.state.client.pipeline(transaction=True)
            pipe.incr(f"{PREFIX}fail:{cid}")
            pipe.expire(f"{PREFIX}fail:{cid}", int(self.cooldown_s * 10))
            n, _ = await pipe.execute()
            if n >= self.failures:
                await self.state.client.set(f"{PREFIX}open:{cid}", 1, px=int(self.cooldown_s * 1000))
                await self.state.client.delete(f"{PREFIX}fail:{cid}")
                log.warning("channel %s failed %d times in a row: cooling down for %.0f s", channel.config.name,
                            n, self.cooldown_s)
            return n

        await self.state.call(count)

    async def succeeded(self, channel: Channel) -> None:
        cid = channel.config.id
        if cid in self._failing:  # only then is there a streak to end: no Redis call on the hot path
            self._failing.discard(cid)
            await self.state.call(lambda: self.state.client.delete(f"{PREFIX}fail:{cid}"))


async def auto_disable(engine: Engine, channel: Channel, reason: str) -> None:
    """Marks the channel auto_disabled (once) and writes the audit event; the catalog notices on its next poll."""
    def write() -> bool:
        with Session(engine) as s:
            result = s.execute(update(ChannelRow).where(ChannelRow.id == channel.config.id,
                                                         ChannelRow.status == "enabled")
                               .values(status="auto_disabled", updated_at=utcnow()))
            if result.rowcount:
                s.add(AuditEvent(actor="relay", action="auto_disable", entity="channel",
                                 entity_id=channel.config.id, before={"status": "enabled"},
                                 after={"status": "auto_disabled", "reason": reason}))
            s.commit()
            return bool(result.rowcount)

    if await asyncio.to_thread(write):
        log.error("channel %s auto-disabled: %s", channel.config.name, reason)
