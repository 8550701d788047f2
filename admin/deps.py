"""What the admin routers share: the admin token check (also run as middleware, before any body is read),
a database session, the secret box, and announcing an edit to every gateway process."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Path, Query, Request
from fastapi.routing import APIRoute
from sqlmodel import Session
from starlette.types import ASGIApp, Receive, Scope, Send

from backends.wire.json_limits import INLINE_PARSE_BYTES, load_json
from relay.auth import bearer_token
from relay.errors import APIError
from relay.secrets import SecretBox

# Row ids in paths and filters: out-of-range integers are a 400/404, never a database overflow.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]
FilterId = Annotated[int | None, Query(ge=1, le=2**31 - 1)]
ADMIN_PREFIX = "/admin"
log = logging.getLogger("relay.admin")


def admin_actor(expected: str | None, authorization: str | None) -> str:
    if not expected:
        raise APIError(401, "The admin API is disabled: start the relay with RELAY_ADMIN_TOKEN set.",
                         "invalid_request_error", None, "admin_disabled")
    token = bearer_token(authorization)
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise APIError(401, "Incorrect admin token.", "invalid_request_error", None, "invalid_admin_token")
    return "admin"


def require_admin(request: Request) -> str:
    return admin_actor(request.app.state.settings.admin_token, request.headers.get("authorization"))


class AdminGuard:
    """Refuses /admin requests without the admin token before anything reads their body, so a stranger's
    megabytes are never parsed (FastAPI parses a body before running dependencies)."""

    def __init__(self, app: ASGIApp, admin_token: str | None) -> None:
        self.app = app
        self.admin_token = admin_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
            headers = dict(scope.get("headers") or [])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            try:
                admin_actor(self.admin_token, authorization)
            except APIError as exc:
                await exc.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JSONLimitedRoute(APIRoute):
    """Admin routes: a JSON body is held to the same parser and structural limits as /v1 bodies (depth,
    containers) before FastAPI parses it, so a deep `options` or `rules` value is a 400 naming where, not a
    recursion error in the secret redaction or the serialiser. The body is already size-limited (relay.app's
    BodyLimit)."""

    def get_route_handler(self):  # noqa: ANN201 (Starlette's endpoint type)
        handler = super().get_route_handler()

        async def checked(request: Request):  # noqa: ANN202
            if request.method in ("POST", "PUT", "PATCH"):
                raw = await request.body()  # cached on the request: FastAPI's own parse reads it again
                if raw.strip():
                    # Whatever orjson refuses is a 400 here too: Python's own parser (FastAPI's) would take
                    # NaN, a byte-order mark or UTF-16 and so skip the depth check.
                    if len(raw) <= INLINE_PARSE_BYTES:
                        load_json(raw)
                    else:  # a large body is parsed off the event loop, as /v1 bodies are
                        await asyncio.to_thread(load_json, raw)
            return await handler(request)

        return checked


def db_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


def secret_box(request: Request) -> SecretBox:
    return request.app.state.catalog.box


def announce(request: Request) -> None:
    """After a write: this process reloads now, the others are nudged (or see the version at their poll). The
    write is committed either way: a failed reload must not make it look failed (the poll catches up)."""
    try:
        request.app.state.config_sync.changed()
    except Exception as exc:
        log.warning("reload after an admin write failed (the next poll retries): %s", str(exc).splitlines()[0])
