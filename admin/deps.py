"""Dependencies shared by the admin routers: the admin token check and a database session."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Path, Query, Request
from sqlmodel import Session

from relay.auth import bearer_token
from relay.errors import RelayError

# Row ids in paths and filters: out-of-range integers are a 400/404, never a database overflow.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]
FilterId = Annotated[int | None, Query(ge=1, le=2**31 - 1)]


def require_admin(request: Request) -> str:
    expected = request.app.state.settings.admin_token
    if not expected:
        raise RelayError(401, "The admin API is disabled: start the relay with RELAY_ADMIN_TOKEN set.",
                         "invalid_request_error", None, "admin_disabled")
    token = bearer_token(request.headers.get("authorization"))
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise RelayError(401, "Incorrect admin token.", "invalid_request_error", None, "invalid_admin_token")
    return "admin"


def db_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session
