"""ASGI middleware in front of the API: a request takes a slot (relay.admission) before its body is parsed, or is
refused at once with a 503 `overloaded` and Retry-After. A small body (64 KB) is read before the slot is taken
and any body must arrive within RELAY_BODY_TIMEOUT_S (408), so clients dribbling their bodies hold no slots for
long. A request whose client goes away is cancelled —
while it waits for a slot, or before its answer starts (a non-streamed call, a stream still waiting for its
first chunk) — so nothing is asked of an upstream for nobody. Streams that have started are stopped by their
own response (backends.wire.event_stream).

Only tenant calls (POST /v1/...) with a known key take slots: health checks, /metrics, the admin API and the
dashboard never wait behind tenant traffic, and a request without a valid key goes straight on to its 401."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.wire.errors import APIError
from relay.admission import Refused, Slots, Waiter, retry_headers
from relay.auth import authenticate, presented_key
from relay.dialects import messages
from relay.metrics import QUEUE_WAIT, SHED, SLOW_BODIES, WAITING

_PREREAD_BYTES = 64 * 1024  # a body up to this size is read before the request takes a slot


class Overload:
    def __init__(self, app: ASGIApp, slots: Slots, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.slots = slots
        self.max_body_bytes = max_body_bytes
        # A body that has not fully arrived by then is answered 408: a client dribbling its body holds no slot for
        # long (a small body holds none while it arrives; a tenant's dribblers cannot take the slots' reserve).
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        tenant = _tenant_of(scope)
        length = _content_length(scope)
        if tenant is None or (length or 0) > self.max_body_bytes:
            # no key, one the route will refuse, or a body it will: that answer is cheaper than a slot
            await self.app(scope, receive, send)
            return
        await Call(self, scope, receive, send, length).run(*tenant)


class Call:
    """One admitted-or-refused request: its slot, its body's deadline, its client's disconnect watch and its body
    replay."""

    def __init__(self, owner: Overload, scope: Scope, receive: Receive, send: Send, length: int | None) -> None:
        self.owner, self.scope, self.receive, self.send, self.length = owner, scope, receive, send, length
        self.task = asyncio.current_task()
        self.buffered: list[Message] = []  # body messages read before the app asked, handed to it first
        self.body_read = False
        self.watcher: asyncio.Task | None = None  # waits for http.disconnect once the body is read
        self.deadline: asyncio.TimerHandle | None = None  # for the body to arrive
        self.gone = False  # the client left, and this call was cancelled for it
        self.slow = False  # the body did not arrive in time, and this call was cancelled for it
        self.started = False  # the answer's first bytes are on their way

    async def run(self, tenant_id: int, weight: int) -> None:
        slots = self.owner.slots
        t0 = time.perf_counter()
        waited: float | None = None
        self._arm()
        try:
            if self.length is not None and self.length <= _PREREAD_BYTES:
                await self._preread()  # before any slot: a client that dribbles its body holds none
            token = slots.enter(tenant_id, weight)
            if isinstance(token, Waiter):
                self._watch_if_read()
                WAITING.inc()
                try:
                    token = await slots.wait(token)
                finally:
                    WAITING.dec()
                waited = time.perf_counter() - t0
                QUEUE_WAIT.observe(waited)
        except Refused as refused:
            SHED.labels(refused.reason).inc()
            self._disarm()
            await self._refuse(refused)
            return
        except asyncio.CancelledError:
            self._disarm()
            if not (self.gone or self.slow):
                raise
            self.task.uncancel()
            if self.gone:
                SHED.labels("client_gone").inc()
            else:
                await self._too_slow()
            return
        granted = time.perf_counter()
        self._watch_if_read()
        try:
            await self.owner.app(self.scope, self._receive, self._send if waited is None else self._timed_send(waited))
        except asyncio.CancelledError:
            if not (self.gone or self.slow):
                raise
            self.task.uncancel()  # the client left (nothing more to answer), or never sent its whole body
            if self.slow and not self.started:
                await self._too_slow()
        finally:
            slots.release(token, time.perf_counter() - granted)
            self._disarm()

    # --- the client's side ----------------------------------------------------------------------------------

    async def _preread(self) -> None:
        """Reads a small body now (ASGI reports a client's leaving only after its body: read, a waiting request's
        client is watched too)."""
        while True:
            message = await self.receive()
            self.buffered.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                self._body_done()
                return

    def _arm(self) -> None:
        self.deadline = asyncio.get_running_loop().call_later(self.owner.body_timeout_s, self._expire)

    def _expire(self) -> None:
        if not self.body_read:
            self.slow = True
            self.task.cancel()

    def _body_done(self) -> None:
        self.body_read = True
        if self.deadline is not None:
            self.deadline.cancel()

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        if self.watcher is not None:
            self.watcher.cancel()

    def _watch_if_read(self) -> None:
        if self.body_read:
            self._watch()

    def _watch(self) -> None:
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._disconnected())

    async def _disconnected(self) -> Message:
        message = await self.receive()  # after the body, only http.disconnect comes: the client left, or we answered
        if not self.started:
            self.gone = True
            self.task.cancel()
        return message

    async def _receive(self) -> Message:
        if self.buffered:
            return self.buffered.pop(0)
        if self.body_read:
            self._watch()
            return await asyncio.shield(self.watcher)  # a stream's own watch asks: the same disconnect
        message = await self.receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            self._body_done()
            self._watch()
        return message

    async def _send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)

    def _timed_send(self, waited_s: float):
        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"server-timing", f"queue;dur={waited_s * 1000:.3f}".encode())]}
            await self._send(message)

        return send

    async def _too_slow(self) -> None:
        SLOW_BODIES.inc()
        error = APIError(408, f"The request body did not arrive within {self.owner.body_timeout_s:g} s "
                              "(RELAY_BODY_TIMEOUT_S).",
                         "invalid_request_error", None, "request_timeout", headers={"Connection": "close"})
        with contextlib.suppress(OSError):
            await error.response()(self.scope, self.receive, self._send)

    async def _refuse(self, refused: Refused) -> None:
        """The 503, written straight to the server: at thousands a second its cost is the relay's headroom."""
        anthropic = self.scope["path"].startswith("/v1/messages")
        body = _REFUSALS[(refused.reason, anthropic)]
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in retry_headers(refused.retry_after_s).items())]
        with contextlib.suppress(OSError):
            await self._send({"type": "http.response.start", "status": 503, "headers": headers})
            await self._send({"type": "http.response.body", "body": body})


def _refusal_bodies() -> dict[tuple[str, bool], bytes]:
    out = {}
    for reason, what in (("overloaded", "The relay is at capacity and cannot take this request now"),
                         ("queue_timeout", "The relay is at capacity: this request waited its turn too long")):
        error = APIError(503, f"{what}; retry after the time in the Retry-After header.", "server_error", None,
                         "overloaded")
        out[(reason, False)] = orjson.dumps(error.body())
        out[(reason, True)] = bytes(messages.error_response(error).body)
    return out


_REFUSALS = _refusal_bodies()


def _content_length(scope: Scope) -> int | None:
    value = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    return int(value) if value is not None and value.isdigit() else None


def _tenant_of(scope: Scope) -> tuple[int, int] | None:
    """(tenant id, weight) of the request's key, authenticated as the route will (the first of each header counts,
    as in the route's); None for no key or one the route will refuse."""
    app: Any = scope.get("app")
    catalog = getattr(getattr(app, "state", None), "catalog", None)
    if catalog is None:
        return None
    authorization = x_api_key = None
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"x-api-key" and x_api_key is None:
            x_api_key = value.decode("latin-1")
    client = scope.get("client")
    try:
        principal = authenticate(catalog.snapshot, presented_key(authorization, x_api_key,
                                                                 scope["path"].startswith("/v1/messages")),
                                 client[0] if client else None)
    except APIError:
        return None
    return principal.tenant.id, principal.tenant.priority or 1
