"""The direct OpenAI client reads a stream as bytes and hands on the events that arrived together as one batch:
events split across reads are put back together, CRLF and comment lines are understood, a runaway event or an
error event ends the stream as an upstream failure, and closing the batches closes the upstream connection.
The upstream is a real HTTP server on 127.0.0.1 (aiohttp) writing exactly the bytes each case needs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from channels import openai_http
from channels.base import UpstreamError
from channels.openai_http import OpenAIClient


def _event(i: int) -> bytes:
    return b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": f"w{i}"}}]}).encode()


async def _serve(writer: Callable[[web.StreamResponse], object]) -> AsyncIterator[tuple[str, dict]]:
    state: dict = {"closed": asyncio.Event()}

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            await writer(response)
        except (ConnectionResetError, asyncio.CancelledError):
            state["closed"].set()
            raise
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", state
    finally:
        await runner.cleanup()
        await openai_http.close_sessions()


async def _batches(writer) -> list[list[dict]]:
    async for url, _ in _serve(writer):
        client = OpenAIClient(url, None, 10)
        return [batch async for batch in client.stream_batches("/chat/completions", {"model": "m"})]
    raise AssertionError("unreachable")


def _texts(batches: list[list[dict]]) -> list[str]:
    return [e["choices"][0]["delta"]["content"] for batch in batches for e in batch]


def test_a_burst_arrives_as_few_batches_in_order():
    async def burst(response):
        await response.write(b"".join(_event(i) + b"\n\n" for i in range(256)) + b"data: [DONE]\n\n")

    batches = asyncio.run(_batches(burst))
    assert _texts(batches) == [f"w{i}" for i in range(256)]
    assert len(batches) < 256 / 4  # read as bytes: many events per batch, not one per event


def test_events_split_across_reads_and_crlf_lines_are_put_back_together():
    async def halves(response):
        raw = _event(1) + b"\r\n\r\n: a comment\r\nevent: message\r\n" + _event(2) + b"\r\n\r\n"
        for i in range(0, len(raw), 7):  # seven bytes at a time, each its own read
            await response.write(raw[i:i + 7])
            await asyncio.sleep(0.002)
        await response.write(b"data: [DONE]\r\n\r\n")

    assert _texts(asyncio.run(_batches(halves))) == ["w1", "w2"]


def test_a_stream_without_done_ends_with_its_last_event():
    async def no_done(response):
        await response.write(_event(1) + b"\n\n" + _event(2))  # no newline after the last one

    assert _texts(asyncio.run(_batches(no_done))) == ["w1", "w2"]


def test_an_error_event_or_a_runaway_event_is_an_upstream_failure(monkeypatch):
    async def error(response):
        await response.write(_event(1) + b"\n\ndata: {\"error\": {\"message\": \"overloaded\"}}\n\n")

    with pytest.raises(UpstreamError) as failed:
        asyncio.run(_batches(error))
    assert failed.value.kind == "stream_error" and "overloaded" in failed.value.message

    monkeypatch.setattr(openai_http, "_MAX_EVENT_BYTES", 4096)

    async def runaway(response):
        for _ in range(10):
            await response.write(b"data: " + b"x" * 1000)  # never a newline

    with pytest.raises(UpstreamError) as failed:
        asyncio.run(_batches(runaway))
    assert failed.value.kind == "stream_error"


def test_closing_the_batches_closes_the_upstream_connection():
    async def endless(response):
        i = 0
        while True:
            await response.write(_event(i) + b"\n\n")
            i += 1
            await asyncio.sleep(0.01)

    async def run() -> bool:
        async for url, state in _serve(endless):
            batches = OpenAIClient(url, None, 10).stream_batches("/chat/completions", {"model": "m"})
            assert await anext(batches)
            await batches.aclose()
            await asyncio.wait_for(state["closed"].wait(), 5)  # the server saw the client go
            return True
        return False

    assert asyncio.run(run())


def test_an_idle_connection_is_not_reused_after_the_upstreams_keepalive():
    """uvicorn (vLLM's server, the worker's) closes a connection idle for 5 s; the relay's pool lets go of it
    before that, so it never sends a request down a connection the upstream is closing (a 502 by chance)."""
    peers: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, keepalive_timeout=60)  # this server would keep it: the client decides
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        try:
            client = OpenAIClient(url, None, 10)
            await client.post("/chat/completions", {"model": "m"})
            await client.post("/chat/completions", {"model": "m"})  # at once: the same connection
            await asyncio.sleep(4.5)
            await client.post("/chat/completions", {"model": "m"})  # after 4.5 s idle: a new one
        finally:
            await runner.cleanup()
            await openai_http.close_sessions()

    asyncio.run(run())
    assert peers[0] == peers[1] and peers[2] != peers[1]
