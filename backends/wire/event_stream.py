"""A server-sent-event response for streams that must stop when their client goes away.

Starlette's StreamingResponse does that, under a server speaking ASGI < 2.4 (uvicorn speaks 2.3), with an anyio
task group per response; at hundreds of streams a second that is a visible share of a stream's cost. Here one
plain task waits for the client's `http.disconnect` and cancels the streaming task, so the iterator's clean-up
(closing the upstream connection, billing what was sent) runs at once. A client that leaves is not an error of
the application: the response ends quietly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send


class EventStreamResponse(Response):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.body_iterator = content
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            streaming.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise  # cancelled from elsewhere (the server shutting down): not ours to swallow
            streaming.uncancel()
        finally:
            watcher.cancel()
            # Cancelled while a chunk was being sent, the iterator sits at its `yield`: close it now, so its
            # clean-up (the upstream connection, the bill) runs here and not whenever it is collected.
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
