"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}}, and the FastAPI handlers that make
every failure of an app one of them (a validation error a 400, an oversized body a 413, a crash a 500)."""

from __future__ import annotations

import hmac
import logging
import math
import random
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

log = logging.getLogger("wire")


class APIError(Exception):
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
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status,
                        media_type="application/json", headers=self.headers)


def retry_headers(seconds: float, spread: float, most: float | None = None) -> dict[str, str]:
    """Retry-After in whole seconds (at least 1, as HTTP wants) and retry-after-ms (which the openai SDKs read
    first), `seconds` spread by up to +`spread` (a fraction) so refused clients do not all come back in the same
    instant, and at most `most` seconds."""
    wait = seconds * (1.0 + random.random() * spread)
    if most is not None:
        wait = min(most, wait)
    return {"Retry-After": str(max(1, math.ceil(wait))), "retry-after-ms": str(max(1, round(wait * 1000)))}


def require_bearer(authorization: str | None, token: str, message: str) -> None:
    """An OpenAI-shaped 401 (with `message`) unless `authorization` is `Bearer <token>` (any case of the scheme;
    compared in constant time: how long a wrong token matched must not show in the answer's timing)."""
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise APIError(401, message, "invalid_request_error", None, "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def not_found(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(404, message, "invalid_request_error", param, code)


def too_large(limit_bytes: int, setting: str) -> APIError:
    return APIError(413, f"The request body is larger than this server accepts ({limit_bytes // 1024} KiB; "
                         f"{setting}).", "invalid_request_error", None, "request_too_large")


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


def install_handlers(app: FastAPI, max_body_bytes: int, body_limit_setting: str) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> Response:
        message, param = _describe_validation(list(exc.errors()))
        return bad_request(message, param).response()

    @app.exception_handler(HTTPException)
    async def _http(req: Request, exc: HTTPException) -> Response:
        if exc.status_code == 413:  # raised while the body is read (wire.body_limit)
            return too_large(max_body_bytes, body_limit_setting).response()
        if exc.status_code == 404 and exc.detail == "Not Found":  # no such route: OpenAI's own words for it
            return not_found(f"Invalid URL ({req.method} {req.url.path[:200]})").response()
        err_type = _STATUS_TYPES.get(exc.status_code, "server_error" if exc.status_code >= 500
                                     else "invalid_request_error")
        return APIError(exc.status_code, str(exc.detail), err_type).response()

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return APIError(500, "The server hit an internal error; please retry.", "server_error").response()
