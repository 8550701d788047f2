"""A direct client for upstreams that speak OpenAI's protocol (channel types `openai` and `local`): the request
goes as the relay built it, the answer comes back as the upstream wrote it, and a stream is read off the socket
as bytes, in batches of the events that arrived together. Nothing is translated, so whatever such an upstream
takes reaches it unchanged — token-id prompts, `echo`, vLLM's extras, strict tool schemas — and its 4xx errors
come back with their own fields. Providers that do not speak OpenAI's protocol go through litellm
(channels.litellm_base)."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import orjson

from channels import errors
from channels.base import UpstreamError, request_id_header

_MAX_ERROR_BODY = 64 * 1024
_MAX_EVENT_BYTES = 16 * 1024 * 1024  # one SSE event larger than this is a broken stream, not a buffer to grow
# Connection pools per event loop (a server has one; keyed by the loop itself, so a later loop never gets a pool
# bound to a closed one): a shared one, and one per channel with a `max_inflight` (keyed by its name and limit).
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, aiohttp.ClientSession]] = \
    weakref.WeakKeyDictionary()


def _session(pool: tuple[str, int] | None = None) -> aiohttp.ClientSession:
    sessions = _sessions.setdefault(asyncio.get_running_loop(), {})
    session = sessions.get(pool)
    if session is None or session.closed:
        # limit: the channel's max_inflight (the relay never sends it more); without one, 0 — concurrency is bounded
        # by the relay's own admission, not by a pool nobody sized.
        # keepalive 4 s: below the 5 s after which uvicorn (vLLM's server, and our worker's) closes an idle
        # connection; aiohttp's 15 s default reuses connections the upstream is closing, a 502 by chance.
        session = sessions[pool] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=pool[1] if pool else 0, ttl_dns_cache=300, enable_cleanup_closed=True, keepalive_timeout=4.0))
    return session


async def close_sessions() -> None:
    """Closes this event loop's pools (at shutdown)."""
    for session in (_sessions.pop(asyncio.get_running_loop(), None) or {}).values():
        with contextlib.suppress(Exception):
            await session.close()


class OpenAIClient:
    def __init__(self, api_base: str, api_key: str | None, timeout_s: float,
                 headers: dict[str, str] | None = None, pool: tuple[str, int] | None = None) -> None:
        self.api_base = api_base.rstrip("/")
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout_s = timeout_s
        self.pool = pool  # (channel name, max_inflight): its own connection pool of that size

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        with _classified(lambda: UpstreamError(502, "The upstream channel sent an answer that is not JSON.",
                                               retryable=True)):
            async with _session(self.pool).post(self.api_base + path, data=orjson.dumps(body),
                                       headers={**self.headers, **request_id_header()}, timeout=timeout) as response:
                if response.status >= 400:
                    raise await _failure(response)
                data = orjson.loads(await response.read())
        if not isinstance(data, dict):
            raise UpstreamError(502, "The upstream channel sent an answer that is not a JSON object.", retryable=True)
        return data

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The upstream's events one by one (see stream_batches)."""
        async for batch in self.stream_batches(path, body):
            for event in batch:
                yield event

    async def stream_batches(self, path: str, body: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """The upstream's events as dicts, in lists of those that arrived together: a fast upstream's burst
        is relayed with one write, not one per event. Closing this generator closes the upstream connection,
        so a client that goes away stops the generation upstream too."""
        # No total time for a stream: the timeout bounds connecting and each wait for the next bytes.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)
        with _classified(lambda: UpstreamError(502, "The upstream stream broke off.", retryable=True,
                                               kind="stream_error")):
            async with _session(self.pool).post(self.api_base + path, data=orjson.dumps(body),
                                       headers={**self.headers, **request_id_header()}, timeout=timeout) as response:
                if response.status >= 400:
                    raise await _failure(response)
                tail = b""
                async for data in response.content.iter_any():
                    lines = (tail + data).split(b"\n") if tail else data.split(b"\n")
                    tail = lines.pop()  # an event cut by the read: completed by the next one
                    if len(tail) > _MAX_EVENT_BYTES:
                        raise ValueError("an event without end")
                    batch, done = _events(lines)
                    if batch:
                        yield batch
                    if done:
                        return
                batch, _ = _events([tail])
                if batch:
                    yield batch


@contextlib.contextmanager
def _classified(broken: Callable[[], UpstreamError]) -> Iterator[None]:
    """Failures on the way to and from the upstream, as the errors that failover and the breaker count; `broken`
    makes the error for an answer that cannot be read."""
    try:
        yield
    except UpstreamError:
        raise
    except TimeoutError:
        raise errors.timeout() from None
    except (aiohttp.ClientConnectionError, OSError):
        raise errors.unreachable() from None
    except (aiohttp.ClientError, ValueError):  # orjson.JSONDecodeError is a ValueError
        raise broken() from None


def _events(lines: list[bytes]) -> tuple[list[dict[str, Any]], bool]:
    """The `data:` events of these complete lines, and whether `[DONE]` ended the stream."""
    events = []
    for line in lines:
        if not line.startswith(b"data:"):
            continue  # blank separators, `event:` names and `:` comments carry nothing here
        data = line[5:].strip()
        if data == b"[DONE]":
            return events, True
        event = orjson.loads(data)
        if isinstance(event, dict) and "error" in event and not event.get("choices"):
            error = event["error"] if isinstance(event["error"], dict) else {}
            message = errors.safe_message(error.get("message"))
            raise UpstreamError(502, f"The upstream stream failed: {message}", retryable=True, kind="stream_error")
        events.append(event)
    return events, False


async def _failure(response: aiohttp.ClientResponse) -> UpstreamError:
    raw = await response.content.read(_MAX_ERROR_BODY)
    error: dict[str, Any] = {}
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
        data = orjson.loads(raw)
        error = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(error, str):  # some servers send {"error": "text"}
            error = {"message": error}
    return errors.from_status(response.status, error if isinstance(error, dict) else {},
                              raw.decode("utf-8", "replace"), errors.retry_after(response.headers))
