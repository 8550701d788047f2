"""Which channel answers, for the pipeline: the channels in routing order, each 1 + its `retries` times
(relay.failover), skipping those at their `max_inflight`; a retryable failure is counted against the channel
(relay.circuit; a channel whose credentials keep being refused is disabled through the app's service write)
and the next try follows. When every channel was busy the client gets a 503 `overloaded` with Retry-After:
a slow channel sheds load instead of piling connections onto it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from channels.base import Channel, UpstreamError
from relay.circuit import CircuitBreaker
from relay.errors import APIError
from relay.failover import client_error, tries
from relay.metrics import RelayMetrics

log = logging.getLogger("relay.dispatch")

# Called with a channel whose credentials were refused K times in a row; the app wires in the service write.
DisableChannel = Callable[[Channel, str], Awaitable[None]]
# Builds the upstream request for a channel about to be tried (and notes the channel on the request's log row).
Prepare = Callable[[Channel], dict[str, Any]]
Batches = AsyncIterator[list[dict[str, Any]]]

_METHODS = {"chat": "chat", "completions": "completion", "embeddings": "embedding"}


class ChannelSlots:
    """Requests each channel is serving from this process. A channel's `max_inflight` is shared by the processes
    of one `serve --workers N`: each takes its N-th (rounded up)."""

    def __init__(self, processes: int) -> None:
        self.processes = max(1, processes)
        self.inflight: dict[int, int] = {}

    def take(self, channel: Channel) -> bool:
        cid, limit = channel.config.id, channel.config.max_inflight
        held = self.inflight.get(cid, 0)
        if limit is not None and held >= math.ceil(limit / self.processes):
            return False
        self.inflight[cid] = held + 1
        return True

    def give(self, channel: Channel) -> None:
        cid = channel.config.id
        held = self.inflight.get(cid, 0) - 1
        if held > 0:
            self.inflight[cid] = held
        else:
            self.inflight.pop(cid, None)


class Dispatcher:
    def __init__(self, breaker: CircuitBreaker, metrics: RelayMetrics, disable_channel: DisableChannel,
                 processes: int = 1) -> None:
        self.breaker = breaker
        self.metrics = metrics
        self.disable_channel = disable_channel
        self.slots = ChannelSlots(processes)
        self._background: set[asyncio.Task] = set()

    async def answer(self, endpoint: str, channels: list[Channel], prepare: Prepare) -> tuple[dict[str, Any], float]:
        """The first channel's answer, and the seconds spent waiting on upstreams."""
        failures: list[UpstreamError] = []
        busy, spent, previous = False, 0.0, None
        for channel in tries(channels, failures):
            if not self.slots.take(channel):
                busy = True
                continue
            t0 = time.perf_counter()
            try:
                previous = self._next_try(previous, channel, failures)
                response = await getattr(channel, _METHODS[endpoint])(prepare(channel))
                await self.breaker.succeeded(channel)
                return response, spent + time.perf_counter() - t0
            except UpstreamError as exc:
                failures.append(exc)
                if not await self._failed(channel, exc):
                    break
            finally:
                self.slots.give(channel)
                spent += time.perf_counter() - t0
                self.metrics.upstream(channel.config.id, time.perf_counter() - t0)
        raise _gave_up(failures, busy)

    async def stream(self, endpoint: str, channels: list[Channel],
                     prepare: Prepare) -> tuple[Channel, list[dict[str, Any]] | None, Batches]:
        """The first channel whose stream starts: it, its first batch (None: it ended at once) and the rest. The
        channel's slot stays taken: `self.slots.give(channel)` once the stream is over."""
        failures: list[UpstreamError] = []
        busy, previous = False, None
        for channel in tries(channels, failures):
            if not self.slots.take(channel):
                busy = True
                continue
            t0, chunks, started = time.perf_counter(), None, False
            try:
                previous = self._next_try(previous, channel, failures)
                request = prepare(channel)
                chunks = (channel.chat_stream_batches if endpoint == "chat"
                          else channel.completion_stream_batches)(request)
                # Nothing has reached the client yet, so a failure here can still be a clean HTTP error
                # (or, with failover, the next channel).
                first = await anext(chunks, None)
                await self.breaker.succeeded(channel)
                started = True
                return channel, first, chunks
            except UpstreamError as exc:
                failures.append(exc)
                if not await self._failed(channel, exc):
                    break
            finally:
                self.metrics.upstream(channel.config.id, time.perf_counter() - t0)
                if not started:  # failed, or cancelled on the way: nothing holds the slot or the connection
                    self.slots.give(channel)
                    if chunks is not None:
                        with contextlib.suppress(Exception, asyncio.CancelledError):
                            await chunks.aclose()
        raise _gave_up(failures, busy)

    def _next_try(self, previous: Channel | None, channel: Channel, failures: list[UpstreamError]) -> Channel:
        if failures and previous is not None:  # a failure that another try follows: a failover
            self.metrics.failover(previous.config.id)
        return channel

    async def _failed(self, channel: Channel, exc: UpstreamError) -> bool:
        """Records the failure of the channel itself; True to try the next channel, False when the request
        itself is at fault (then nothing is counted against the channel)."""
        if not exc.retryable:
            return False
        if exc.kind == "upstream_overloaded":
            return True  # busy, not broken: another channel may take it, and its circuit stays closed
        log.warning("channel %s failed (%s): %s", channel.config.name, exc.kind, exc.message)
        if await self.breaker.failed(channel, credentials=exc.kind == "upstream_auth"):
            # Off the request path: with the database away the write fails, and failover must not.
            task = asyncio.create_task(self._disable(channel, exc.message))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return True

    async def _disable(self, channel: Channel, reason: str) -> None:
        try:
            await self.disable_channel(channel, reason)
            await self.breaker.forget(channel)
        except Exception as exc:
            log.error("could not auto-disable channel %s (it keeps failing over): %s", channel.config.name,
                      str(exc).splitlines()[0][:300])


def _gave_up(failures: list[UpstreamError], busy: bool) -> APIError:
    """The client's error once no channel answered: the request's own fault first, then "every channel is busy"
    (retry later), then the last channel's failure."""
    if failures and not failures[-1].retryable:
        return client_error(failures[-1])
    if busy:
        return client_error(UpstreamError(503, "Every channel serving this model is at its limit of requests at "
                                               "once; retry shortly.", retryable=True, kind="channel_busy"))
    return client_error(failures[-1])
