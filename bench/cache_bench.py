"""Cache hits against misses through the full pipeline (auth, policy, cache) in one run.

The fake upstream answers after --upstream-delay-ms (50 by default). Misses are greedy requests that
were never asked before (each a new prompt); hits repeat one greedy request. For both: p50/p99 latency
and requests/s at concurrency 1 and 32, and, from `Server-Timing: relay;dur`, what a hit costs inside
the relay (target: under 2 ms p50 at concurrency 1). Needs Redis (RELAY_REDIS_URL, default db 9 on
127.0.0.1:6379, flushed first).

    .venv/bin/python bench/cache_bench.py [--seconds 5] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Servers, free_port, pct, server_timing, wait_ready  # noqa: E402
from bench.relay_bench import MODEL, setup_relay  # noqa: E402

_counter = itertools.count()


def body(hit: bool) -> bytes:
    content = "the same question" if hit else f"question number {next(_counter)} {secrets.token_hex(4)}"
    return json.dumps({"model": MODEL, "temperature": 0, "messages": [{"role": "user", "content": content}]}).encode()


async def one(session: aiohttp.ClientSession, url: str, key: str, hit: bool, lat: list, inside: list) -> None:
    t0 = time.perf_counter()
    async with session.post(url, data=body(hit), headers={"Authorization": f"Bearer {key}",
                                                          "Content-Type": "application/json"}) as r:
        await r.read()
        outcome = r.headers.get("X-Relay-Cache")
        timing = r.headers.get("Server-Timing", "")
    if r.status != 200 or outcome != ("hit" if hit else "miss"):
        raise RuntimeError(f"expected a {'hit' if hit else 'miss'}, got {r.status} {outcome}")
    lat.append((time.perf_counter() - t0) * 1000)
    if "relay" in (durations := server_timing(timing)):
        inside.append(durations["relay"])


async def phase(url: str, key: str, hit: bool, concurrency: int, seconds: float, requests: int) -> dict:
    lat: list[float] = []
    inside: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        if concurrency == 1:
            t0 = time.perf_counter()
            for _ in range(requests):
                await one(s, url, key, hit, lat, inside)
        else:
            t0, deadline = time.perf_counter(), time.perf_counter() + seconds

            async def loop() -> None:
                while time.perf_counter() < deadline:
                    await one(s, url, key, hit, lat, inside)

            await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"rps": len(lat) / wall, "p50": pct(lat, 50), "p99": pct(lat, 99), "inside_p50": pct(inside, 50),
            "inside_p99": pct(inside, 99), "n": len(lat)}


async def main(args: argparse.Namespace) -> None:
    redis_url = os.environ.get("RELAY_REDIS_URL", "redis://127.0.0.1:6379/9")
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    servers = Servers(Path(tempfile.mkdtemp(prefix="cache-bench-")))
    try:
        port, token = free_port(), secrets.token_hex(16)
        async with aiohttp.ClientSession() as s:
            upstream = await servers.start_fake_upstream(s, free_port(), args.upstream_delay_ms)
            env = {"RELAY_DATABASE_URL": f"sqlite:///{servers.tmp / 'bench.db'}", "RELAY_REDIS_URL": redis_url,
                   "RELAY_ADMIN_TOKEN": token, "RELAY_PORT": str(port)}
            base = f"http://127.0.0.1:{port}"
            proc = servers.start("relay", [sys.executable, "-m", "admin.cli", "serve", "--log-level", "warning"], env)
            await wait_ready(s, base + "/health", proc, 90)
            key = await setup_relay(s, base, token, upstream)
        url = base + "/v1/chat/completions"
        # store the one answer every hit repeats
        async with aiohttp.ClientSession() as s, s.post(url, data=body(True),
                                                        headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
        rows = []
        for hit in (False, True):
            for conc in (1, 32):
                print(f"measuring {'hits' if hit else 'misses'} at c={conc} ...", file=sys.stderr, flush=True)
                rows.append((hit, conc, await phase(url, key, hit, conc, args.seconds, args.requests)))
    finally:
        servers.stop_all()
    print(f"\ncache benchmark: fake upstream delay {args.upstream_delay_ms:g} ms, Redis {redis_url}\n")
    print(f"{'':8}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'inside p50':>12}{'inside p99':>12}{'n':>7}")
    for hit, conc, r in rows:
        print(f"{'hit' if hit else 'miss':8}{conc:>5}{r['rps']:>10.1f}{r['p50']:>9.2f}{r['p99']:>9.2f}"
              f"{r['inside_p50']:>12.3f}{r['inside_p99']:>12.3f}{r['n']:>7}")
    miss1, hit1 = rows[0][2], rows[2][2]
    miss32, hit32 = rows[1][2], rows[3][2]
    print(f"\nhit vs miss at c=1: {miss1['p50'] / hit1['p50']:.1f}x lower p50; at c=32: "
          f"{hit32['rps'] / miss32['rps']:.1f}x the requests/s")
    verdict = "met" if hit1["inside_p50"] < 2 else "NOT met"
    print(f"a hit inside the relay at c=1: p50 {hit1['inside_p50']:.3f} ms (target < 2 ms: {verdict})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each c=32 phase")
    parser.add_argument("--requests", type=int, default=200, help="requests of each c=1 phase")
    parser.add_argument("--upstream-delay-ms", type=float, default=50.0)
    asyncio.run(main(parser.parse_args()))
