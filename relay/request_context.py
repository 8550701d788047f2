"""Request ids and log lines.

Every answer carries `X-Request-Id`: the client's own when it is a sane token (1-128 characters of letters,
digits and `._:-`), a new one otherwise. The id is set for the whole request (channels.base.REQUEST_ID), so
the upstream receives it, its request-log row stores it, and every log line written while serving it names
it. Log lines are plain text by default, JSON objects one per line with RELAY_LOG_FORMAT=json (uvicorn's
access log included)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from channels.base import REQUEST_ID

HEADER = b"x-request-id"
_SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # fixed pattern, linear time; "-" means "no request"
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class RequestId:
    """ASGI middleware: takes or makes the request's id, returns it on the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        token = REQUEST_ID.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def request_id(scope: Scope) -> str:
    """The request's id: the client's X-Request-Id when sane, a new one otherwise."""
    given = next((value for name, value in scope["headers"] if name == HEADER), b"").decode("latin-1")
    return given if _SANE.fullmatch(given) else os.urandom(16).hex()  # 128 random bits, as uuid4's, cheaper


class WithRequestId(logging.Filter):
    """Gives every record the current request's id ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id (and the access log's fields)."""

    converter = time.gmtime  # UTC, as the Z says

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                                "level": record.levelname.lower(), "logger": record.name,
                                "message": record.getMessage(), "request_id": getattr(record, "request_id", "-")}
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            line.update(client=client, method=method, path=path, http_version=version, status=status)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def log_config(log_format: str, level: str) -> dict[str, Any]:
    """logging.config.dictConfig for `serve` (passed to uvicorn, so every gateway process uses it)."""
    json_lines = log_format.strip().lower() == "json"
    formatter = {"()": JsonLines} if json_lines else {"format": PLAIN_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "main", "filters": ["request_id"],
               "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": WithRequestId}},
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "root": {"handlers": ["main"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "level": level.upper(), "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
