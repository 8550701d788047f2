"""The SSE response both servers stream with (backends.wire.event_stream), under a real uvicorn: every chunk is
delivered, and a client that leaves stops the stream at once — even while it waits for its next chunk, which is
when a relay must close its upstream (the generation goes on otherwise)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
from fastapi import FastAPI

from backends.wire.event_stream import EventStreamResponse
from tests.fake_upstream import ServerThread


def _app(closed: threading.Event, waits_after: int):
    app = FastAPI()

    @app.get("/events")
    async def events() -> EventStreamResponse:
        async def chunks():
            try:
                for i in range(waits_after):
                    yield f"data: {i}\n\n".encode()
                await asyncio.Event().wait()  # an upstream that has nothing more to say for now
            finally:
                closed.set()

        return EventStreamResponse(chunks(), headers={"X-Kind": "test"})

    return app


def test_every_chunk_arrives_and_the_stream_ends():
    closed = threading.Event()
    app = FastAPI()

    @app.get("/events")
    async def events() -> EventStreamResponse:
        async def chunks():
            for i in range(50):
                yield f"data: {i}\n\n".encode()
            closed.set()

        return EventStreamResponse(chunks())

    with ServerThread(app) as server:
        response = httpx.get(server.url + "/events", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.text == "".join(f"data: {i}\n\n" for i in range(50))
    assert closed.is_set()


def test_a_client_that_leaves_stops_a_waiting_stream_at_once():
    closed = threading.Event()
    with ServerThread(_app(closed, waits_after=2)) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"data: 1\n\n" not in received:
            received += sock.recv(4096)
        assert b"x-kind: test" in received.lower()
        time.sleep(0.2)
        assert not closed.is_set()  # still waiting for its next chunk
        sock.close()
        assert closed.wait(2), "the stream went on after its client left"
        # and the server still serves
        assert httpx.get(server.url + "/docs", timeout=5).status_code == 200
