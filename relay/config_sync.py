"""Keeps every gateway process's catalog current.

The database's config version is the truth: each process checks it every RELAY_CONFIG_POLL_S and reloads
when it moved. Where Redis is up, a process that made an edit also publishes a nudge, and every process
listening reloads at once instead of at its next poll; on (re)subscribing a process checks the version once, so
a nudge sent before it listened is not missed. A lost nudge costs at most one poll interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
from redis.exceptions import RedisError

from relay.catalog import Catalog
from relay.redis_state import RedisState

log = logging.getLogger("relay.config")


class ConfigSync:
    def __init__(self, catalog: Catalog, state: RedisState, poll_s: float) -> None:
        self.catalog = catalog
        self.state = state
        self.poll_s = poll_s
        self.channel = state.prefix + "config"
        self._publisher: redis.Redis | None = None  # sync: admin routers run in worker threads

    def changed(self) -> None:
        """After an edit made by this process (from a worker thread): reload here, nudge the others."""
        self.catalog.reload_if_changed()
        if self.state.url is None:
            return
        try:
            if self._publisher is None:
                self._publisher = redis.Redis.from_url(self.state.url, socket_connect_timeout=0.25,
                                                       socket_timeout=0.5)
            self._publisher.publish(self.channel, str(self.catalog.version))
        except (RedisError, OSError) as exc:
            log.info("config nudge not published (%s); other processes poll", type(exc).__name__)

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.catalog.refresh()

    async def listen_forever(self) -> None:
        if self.state.client is None:
            return
        while True:
            try:
                async with self.state.client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    # A nudge published before this subscription (at start, or while Redis was away) reached
                    # nobody here: look at the version once now rather than at the next poll.
                    await self.catalog.refresh()
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and _newer(message.get("data"), self.catalog.version):
                            await self.catalog.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: polling still works; try again shortly
                log.debug("config listener stopped (%s); retrying", type(exc).__name__)
                await asyncio.sleep(2.0)

    def close(self) -> None:
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                self._publisher.close()


def _newer(data: object, held: int) -> bool:
    try:
        return int(data) > held  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
