"""A body size limit enforced while a body is read: a Content-Length over the limit is answered 413 before
anything is read, a body without one is stopped as soon as its bytes pass the limit. The answer is in
OpenAI's error shape (Starlette's own limiter answers plain text, which OpenAI clients cannot parse)."""

from __future__ import annotations

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.wire.errors import too_large


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, setting: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting  # named in the 413, so an operator knows what to raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers") or ():
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await too_large(self.max_bytes, self.setting).response()(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge  # an HTTPException: FastAPI passes it on, wire.errors renders the 413
            return message

        await self.app(scope, limited, send)
