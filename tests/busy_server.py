"""A tiny ASGI server for tests/test_event_loop.py whose event loop is kept busy: a task spins for --hog-ms, yields
once, and spins again, so every loop iteration lasts about that long (as a gateway's do under load). It answers every
request with 200 "ok".

    python -m tests.busy_server --port P --loop relay.event_loop:new_event_loop|uvloop [--hog-ms 20] [--nofile N]"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

import uvicorn


def app_with_hog(hog_s: float):
    async def hog() -> None:
        while True:
            until = time.perf_counter() + hog_s
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0)

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if hog_s:
                        app.hog = asyncio.create_task(hog())
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", required=True)
    parser.add_argument("--hog-ms", type=float, default=0.0)
    parser.add_argument("--nofile", type=int, default=0, help="lower the open files limit to this")
    args = parser.parse_args()
    if args.nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))
    uvicorn.run(app_with_hog(args.hog_ms / 1000), host="127.0.0.1", port=args.port, loop=args.loop,
                log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
