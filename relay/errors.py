"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}.

Transient trouble is a 5xx so ONE API retries another channel; the words that make ONE API
auto-disable a channel ("credit", "balance", "permission denied", insufficient_quota, ...) appear only
when they are the truth about the caller's key."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response


class RelayError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status,
                        media_type="application/json", headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RelayError:
    return RelayError(400, message, "invalid_request_error", param, code)


def invalid_key(message: str = "Incorrect API key provided.") -> RelayError:
    return RelayError(401, message, "invalid_request_error", None, "invalid_api_key")


def forbidden(message: str, param: str | None = None) -> RelayError:
    # Deliberately not "permission_error": ONE API disables a whole channel on that type, and a
    # forbidden model or address is about this one request.
    return RelayError(403, message, "invalid_request_error", param, "forbidden")


def not_found(message: str, param: str | None = None, code: str | None = None) -> RelayError:
    return RelayError(404, message, "invalid_request_error", param, code)


def too_large(limit_bytes: int) -> RelayError:
    return RelayError(413, f"The request body is larger than this relay accepts ({limit_bytes // 1024} KiB; "
                           "RELAY_MAX_BODY_MB).", "invalid_request_error", None, "request_too_large")


_STATUS_TYPES = {401: "invalid_request_error", 403: "invalid_request_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 429: "rate_limit_error"}


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
    param = ".".join(loc) or None
    msg = first.get("msg", "Invalid request body.")
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request.", None
    return (f"Invalid value for '{param}': {msg}." if param else f"{msg}."), param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RelayError)
    async def _relay_error(_req: Request, exc: RelayError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation(list(exc.errors()))
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 413:  # raised while the body is read (relay.body_limit)
            return too_large(req.app.state.settings.max_body_bytes).response()
        err_type = _STATUS_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500
                                     else "invalid_request_error")
        return RelayError(exc.status_code, str(exc.detail), err_type).response()

    @app.exception_handler(OperationalError)
    async def _database_down(_req: Request, exc: OperationalError) -> Response:
        logging.getLogger("relay").warning("database unavailable: %s", str(exc).splitlines()[0][:300])
        return RelayError(503, "The relay's database is unavailable right now; retry shortly.", "server_error",
                          None, "database_unavailable", headers={"Retry-After": "5"}).response()

    @app.exception_handler(DataError)
    async def _unstorable(_req: Request, exc: DataError) -> Response:
        # A value the database refuses (a NUL in a string, a number out of its column's range): the input's fault.
        return bad_request("A value in this request cannot be stored or searched for (out of range or invalid "
                           "characters).", None, "invalid_value").response()

    @app.exception_handler(IntegrityError)
    async def _conflict(_req: Request, exc: IntegrityError) -> Response:
        return RelayError(409, "This conflicts with an existing entry.", "invalid_request_error", None,
                          "conflict").response()

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> Response:
        logging.getLogger("relay").exception("unhandled error")
        return RelayError(500, "The relay hit an internal error; please retry.", "server_error").response()
