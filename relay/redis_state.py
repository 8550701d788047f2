"""The shared Redis connection of the cache and the rate limiter. Redis trouble is never a request's
failure: an operation that fails returns None, is counted, warns at most every 10 s, and Redis is left
alone for a second before the next try."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("relay.redis")


class RedisState:
    def __init__(self, url: str | None, deployment_id: str = "") -> None:
        self.url = url
        # Every key of this deployment starts with this: a recreated database (a new deployment id) never
        # reads the cache, buckets or circuit state of the old one.
        self.prefix = f"relay:{deployment_id[:16]}:" if deployment_id else "relay:"
        # A blocking pool: a burst of requests waits a moment for a connection instead of failing with
        # "too many connections", which would look like Redis being down (limits off, cache off) for a second.
        # The read timeout is generous for the same reason: under a burst this process's own event loop can be
        # late to read an answer Redis sent at once. A Redis that is gone refuses connections at once anyway.
        self.client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            url, max_connections=256, timeout=2.0, socket_connect_timeout=0.25, socket_timeout=3.0,
            health_check_interval=0)) if url else None
        self.errors = 0
        self._down_until = 0.0
        self._warned_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.client is not None and time.monotonic() >= self._down_until

    async def call(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        if not self.enabled:
            return None
        try:
            return await operation()
        except (TimeoutError, RedisError, OSError) as exc:
            self.errors += 1
            self._down_until = time.monotonic() + 1.0
            if time.monotonic() - self._warned_at > 10:
                self._warned_at = time.monotonic()
                log.warning("Redis unavailable (%s); serving without cache and rate limits", type(exc).__name__)
            return None

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose(close_connection_pool=True)
