"""The gateway's errors: the wire's OpenAI-shaped APIError (backends.wire.errors), what only the gateway says
(bad keys, forbidden models), and what its database's failures look like to a client.

Transient trouble is a 5xx so ONE API retries another channel; the words that make ONE API auto-disable a
channel ("credit", "balance", "permission denied", insufficient_quota, ...) appear only when they are the truth
about the caller's key."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from starlette.responses import Response

from backends.wire import errors as wire
from backends.wire.errors import APIError, bad_request, not_found

__all__ = ["APIError", "bad_request", "forbidden", "install_handlers", "invalid_key", "not_found"]


def invalid_key(message: str = "Incorrect API key provided.") -> APIError:
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key")


def forbidden(message: str, param: str | None = None) -> APIError:
    # Deliberately not "permission_error": ONE API disables a whole channel on that type, and a
    # forbidden model or address is about this one request.
    return APIError(403, message, "invalid_request_error", param, "forbidden")


def install_handlers(app: FastAPI, max_body_bytes: int) -> None:
    wire.install_handlers(app, max_body_bytes, "RELAY_MAX_BODY_MB")

    @app.exception_handler(OperationalError)
    async def _database_down(_req: Request, exc: OperationalError) -> Response:
        logging.getLogger("relay").warning("database unavailable: %s", str(exc).splitlines()[0][:300])
        return APIError(503, "The relay's database is unavailable right now; retry shortly.", "server_error",
                        None, "database_unavailable", headers={"Retry-After": "5"}).response()

    @app.exception_handler(DataError)
    async def _unstorable(_req: Request, exc: DataError) -> Response:
        # A value the database refuses (a NUL in a string, a number out of its column's range): the input's fault.
        return bad_request("A value in this request cannot be stored or searched for (out of range or invalid "
                           "characters).", None, "invalid_value").response()

    @app.exception_handler(IntegrityError)
    async def _conflict(_req: Request, exc: IntegrityError) -> Response:
        return APIError(409, "This conflicts with an existing entry.", "invalid_request_error", None,
                        "conflict").response()
