"""Per-endpoint scenario of bench/relay_bench.py: the same non-streamed work through /v1/chat/completions,
/v1/messages (Anthropic's shape, translated to chat and back) and /v1/embeddings, against the fake upstream.

For each: the relay's overhead at concurrency 1 — client latency minus the `upstream;dur` the relay reports, so
it holds the HTTP server, parsing, translation and the pipeline, and nothing of the upstream — p50/p99, and
requests/s at the throughput concurrency. The verdict: each endpoint's p50 overhead within 1.5x of chat's,
measured in the same run (the issue's bar)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from bench.common import checkpoint, pct, server_timing

MESSAGES_ASK = [{"role": "user", "content": "Say hello."}]
BODIES = {
    "chat": ("/v1/chat/completions", {"messages": MESSAGES_ASK}),
    "messages": ("/v1/messages", {"messages": MESSAGES_ASK, "max_tokens": 64, "system": "Be brief."}),
    # A fresh input each time would be fairer to a cache; the bench relay has none (RELAY_REDIS_URL=none).
    "embeddings": ("/v1/embeddings", {"input": ["Say hello.", "Say goodbye."], "encoding_format": "base64"}),
}
TARGET_RATIO = 1.5


@dataclass
class EndpointResult:
    overhead_ms: list[float] = field(default_factory=list)
    rps: float = 0.0
    errors: int = 0


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str],
               res: EndpointResult, timed: bool) -> bool:
    checkpoint()
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as r:
        await r.read()
        status, timing = r.status, r.headers.get("Server-Timing", "")
    if status != 200:
        res.errors += 1
        return False
    upstream = server_timing(timing).get("upstream")
    if timed and upstream is not None:
        res.overhead_ms.append((time.perf_counter() - t0) * 1000 - upstream)
    return True


async def measure_endpoints(base: str, key: str, model: str, args: argparse.Namespace) -> dict[str, EndpointResult]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    results: dict[str, EndpointResult] = {}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for name, (path, extra) in BODIES.items():
            res = results[name] = EndpointResult()
            url, body = base + path, json.dumps({"model": model, **extra}).encode()
            for _ in range(50):  # warm-up
                await _one(session, url, body, headers, res, timed=False)
            res.errors = 0
            for _ in range(args.requests):
                await _one(session, url, body, headers, res, timed=True)
            deadline, t0 = time.perf_counter() + args.duration / 2, time.perf_counter()

            async def loop(url: str = url, body: bytes = body, res: EndpointResult = res,
                           deadline: float = deadline) -> int:
                done = 0
                while time.perf_counter() < deadline:
                    done += await _one(session, url, body, headers, res, timed=False)
                return done

            res.rps = sum(await asyncio.gather(*(loop() for _ in range(args.concurrency)))) / (
                time.perf_counter() - t0)
    return results


def report_endpoints(results: dict[str, EndpointResult], concurrency: int) -> None:
    print("\npolicy-relay per endpoint, non-streamed (overhead = latency at c=1 - upstream;dur):")
    print(f"{'endpoint':<14}{'overhead p50':>14}{'p99':>10}{f'req/s @c={concurrency}':>16}{'errors':>8}")
    for name, r in results.items():
        print(f"{name:<14}{pct(r.overhead_ms, 50):>14.3f}{pct(r.overhead_ms, 99):>10.3f}{r.rps:>16.1f}{r.errors:>8}")
    chat = pct(results["chat"].overhead_ms, 50)
    for name in ("messages", "embeddings"):
        ratio = pct(results[name].overhead_ms, 50) / chat if chat else float("inf")
        verdict = "met" if ratio <= TARGET_RATIO else "NOT met"
        print(f"  {name} / chat overhead p50: {ratio:.2f}x  (target <= {TARGET_RATIO}x: {verdict})")
