"""ASGI middleware in front of the API: a request passes relay.admission's gate before its body is parsed — it starts,
waits its turn, or is refused on arrival with a 503 `overloaded` and Retry-After, its body unread. A small body
(64 KB) is read before a waiting request takes its place (or an in-flight slot) and any body must arrive within
RELAY_BODY_TIMEOUT_S (408), so clients dribbling their bodies hold no slots for long. A request whose client goes
away is cancelled — while it waits, or before its answer starts (a non-streamed call, a stream still waiting for
its first chunk) — so nothing is asked of an upstream for nobody. Streams that have started are stopped by their
own response (backends.wire.event_stream).

Only tenant calls (POST /v1/...) with a known key pass the gate: health checks, /metrics, the admin API and the
dashboard never wait behind tenant traffic, and a request without a valid key goes straight on to its 401."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.wire.errors import APIError
from relay import request_context
from relay.admission import Gate, Refused, Waiter, retry_headers
from relay.auth import authenticate, presented_key
from relay.dialects import messages
from relay.metrics import QUEUE_WAIT, SHED, SLOW_BODIES, WAITING

_PREREAD_BYTES = 64 * 1024  # a body up to this size is read before the request enters the gate


class Overload:
    """In front of everything (relay.app puts it outside FastAPI's own middleware): at thousands of refusals a second,
    every layer a refusal passes through is capacity taken from the requests that were let in."""

    def __init__(self, app: ASGIApp, state: Any, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.state = state  # the app's: its gate, and its catalog once started
        self.gate: Gate = state.gate
        self.max_body_bytes = max_body_bytes
        # A body that has not fully arrived by then is answered 408: a client dribbling its body holds no slot for
        # long (a small body holds none while it arrives; a tenant's dribblers cannot take the slots' reserve).
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tenant, length = self._screen(scope, scope.get("client"))
        if tenant is None:
            await self.app(scope, receive, send)
            return
        refused = self.gate.refusal(*tenant)
        if refused is not None:  # decided on arrival: the body is never read
            await refuse(refused, scope, send)
            return
        await Call(self, scope, receive, send, length).run(*tenant)

    def refusal_now(self, scope: Scope) -> Refused | None:
        """For relay.http_protocol, before the server starts the app: the refusal this request gets on arrival, if
        any (counted). Keys with an IP allow-list are left to the app, which sees the address a trusted proxy gave."""
        tenant, _ = self._screen(scope, None)
        return self.gate.refusal(*tenant) if tenant is not None else None

    def _screen(self, scope: Scope, client: tuple | None) -> tuple[tuple[int, int] | None, int | None]:
        """(tenant id, weight) of a tenant call that passes the gate, and its Content-Length; (None, _) for anything
        else: not POST /v1/..., no key or one the route will refuse, a body it will (that answer is cheaper)."""
        catalog = getattr(self.state, "catalog", None)
        if catalog is None or scope["type"] != "http" or scope["method"] != "POST" \
                or not scope["path"].startswith("/v1/"):
            return None, None
        tenant, length = _tenant_of(scope, catalog, client[0] if client else None)
        return (None, length) if (length or 0) > self.max_body_bytes else (tenant, length)


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
        self.complete = False  # and its last

    async def run(self, tenant_id: int, weight: int) -> None:
        gate = self.owner.gate
        t0 = time.perf_counter()
        waited: float | None = None
        self._arm()
        try:
            if self.length is not None and self.length <= _PREREAD_BYTES:
                await self._preread()  # before any slot: a client that dribbles its body holds none
            token = gate.enter(tenant_id, weight)
            if isinstance(token, Waiter):
                self._watch_if_read()
                WAITING.inc()
                try:
                    token = await gate.wait(token)
                finally:
                    WAITING.dec()
                waited = time.perf_counter() - t0
                QUEUE_WAIT.observe(waited)
        except Refused as refused:
            self._disarm()
            await refuse(refused, self.scope, self._send)
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
            gate.release(token)
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
        if self.watcher is not None and not self.complete:
            # a complete answer ends the watch by itself (the server reports the end as a disconnect): cancelling
            # it would leave a CancelledError and its traceback in a reference cycle for the collector
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
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.complete = True  # sent: the server now reports the end to the watcher

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
                         "invalid_request_error", None, "request_timeout",
                         headers={"Connection": "close", "X-Request-Id": request_context.request_id(self.scope)})
        with contextlib.suppress(OSError):
            await error.response()(self.scope, self.receive, self._send)


async def refuse(refused: Refused, scope: Scope, send: Send) -> None:
    """The 503, written straight to the server (with the request's id: RequestId is further in): at thousands a
    second its cost is the relay's headroom."""
    body, headers = refusal(refused, scope)
    with contextlib.suppress(OSError):
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def refusal(refused: Refused, scope: Scope) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The 503's body and headers, counted."""
    _SHED[refused.reason].inc()
    body = _REFUSALS[(refused.reason == "queue_timeout", scope["path"].startswith("/v1/messages"))]
    retry = retry_headers(refused.retry_after_s)
    return body, [(b"content-type", b"application/json"), (b"content-length", _LENGTHS[len(body)]),
                  (b"retry-after", retry["Retry-After"].encode()),
                  (b"retry-after-ms", retry["retry-after-ms"].encode()),
                  (request_context.HEADER, request_context.request_id(scope).encode())]


def _refusal_bodies() -> dict[tuple[bool, bool], bytes]:
    """(waited its whole bound, Anthropic's shape) → the body."""
    out = {}
    for waited, what in ((False, "The relay is at capacity and cannot start this request in time"),
                         (True, "The relay is at capacity: this request waited its turn too long")):
        error = APIError(503, f"{what}; retry after the time in the Retry-After header.", "server_error", None,
                         "overloaded")
        out[(waited, False)] = orjson.dumps(error.body())
        out[(waited, True)] = bytes(messages.error_response(error).body)
    return out


_REFUSALS = _refusal_bodies()
_LENGTHS = {len(body): str(len(body)).encode() for body in _REFUSALS.values()}
_SHED = {reason: SHED.labels(reason) for reason in ("loop_busy", "inflight_limit", "queue_timeout")}


def _tenant_of(scope: Scope, catalog: Any, client_ip: str | None) -> tuple[tuple[int, int] | None, int | None]:
    """(tenant id, weight) of the request's key, authenticated as the route will (the first of each header counts,
    as in the route's), None for no key or one the route will refuse; and the body's Content-Length."""
    authorization = x_api_key = length = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is None:
                authorization = value.decode("latin-1")
        elif name == b"content-length":
            if length is None and value.isdigit():
                length = int(value)
        elif name == b"x-api-key" and x_api_key is None:
            x_api_key = value.decode("latin-1")
    try:
        principal = authenticate(catalog.snapshot, presented_key(authorization, x_api_key,
                                                                 scope["path"].startswith("/v1/messages")), client_ip)
    except APIError:
        return None, length
    return (principal.tenant.id, principal.tenant.priority or 1), length
