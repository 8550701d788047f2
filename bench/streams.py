"""Streamed scenarios of bench/relay_bench.py: short streams (13 SSE events: 11 words, the finish chunk and the
usage chunk) and long ones (258 events: 256 words), `stream_options.include_usage` on, from the same fake
upstream. Measured per target: streamed requests/s at the throughput concurrency, chunks/s relayed on long
streams, time to first byte (the first `data:` event) p50/p99 at concurrency 1 and at the throughput
concurrency, and the serving processes' CPU time per relayed chunk (user + system, children included)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
import psutil

from bench.common import checkpoint

SHORT, LONG = "bench-short", "bench-long"
# the fake upstream's names for them: distinct words (LiteLLM ends a stream that repeats one chunk 100 times)
UPSTREAM_MODELS = {SHORT: "numbered-11", LONG: "numbered-256"}
EVENTS = {SHORT: 13, LONG: 258}


def stream_body(model: str) -> bytes:
    return json.dumps({"model": model, "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()


@dataclass
class StreamResult:
    short_rps: float = 0.0
    long_rps: float = 0.0
    chunks_per_s: float = 0.0
    ttfb_c1_ms: list[float] = field(default_factory=list)
    ttfb_busy_ms: list[float] = field(default_factory=list)
    cpu_us_per_chunk: float | None = None
    errors: int = 0
    other_counts: int = 0  # streams that ended well with another number of events than the upstream sent


async def one_stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str,
                     expected: int, res: StreamResult, ttfb: list[float] | None) -> int:
    """One streamed request read to its end; the events relayed, or 0 when anything was wrong with it. The first
    event is read as it comes (its time is the TTFB), the rest as one read, as a non-streamed answer is read: the
    load generator shares the CPUs with the servers, so its own per-line work must not weigh on one side."""
    checkpoint()
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=stream_body(model), headers=headers) as r:
            if r.status != 200:
                await r.read()
                res.errors += 1
                return 0
            first = b""
            while not first.startswith(b"data:"):
                first = await r.content.readline()
                if not first:
                    break  # the end, without an event
            if first and ttfb is not None:
                ttfb.append((time.perf_counter() - t0) * 1000)
            body = first + await r.content.read()
    except (aiohttp.ClientError, TimeoutError):
        res.errors += 1
        return 0
    done = body.rstrip().endswith(b"data: [DONE]")
    events = body.count(b"\ndata:") + body.startswith(b"data:") - done
    if not done:
        res.errors += 1
        return 0
    res.other_counts += events != expected  # relayed whole, but re-chunked (the LiteLLM proxy does)
    return events


async def _for(session: aiohttp.ClientSession, url: str, headers: dict[str, str], model: str, expected: int,
               res: StreamResult, conc: int, seconds: float, ttfb: list[float] | None) -> tuple[int, int, float]:
    """`conc` loops streaming back to back until the deadline: (streams, events, seconds taken)."""
    deadline = time.perf_counter() + seconds

    async def loop() -> tuple[int, int]:
        streams = events = 0
        while time.perf_counter() < deadline:
            n = await one_stream(session, url, headers, model, expected, res, ttfb)
            streams += n > 0
            events += n
        return streams, events

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(loop() for _ in range(conc)))
    return sum(c[0] for c in counts), sum(c[1] for c in counts), time.perf_counter() - t0


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def model_name(target_name: str, model: str) -> str:
    """The upstream direct is asked for the fake upstream's own model names."""
    return UPSTREAM_MODELS[model] if target_name == "upstream direct" else model


async def measure_streams(name: str, url: str, headers: dict[str, str], args: argparse.Namespace,
                          pid: int | None) -> StreamResult:
    """Warm-up, TTFB at c=1, short streams at c=--concurrency (with their TTFB), long streams with CPU."""
    res = StreamResult()
    short, long = model_name(name, SHORT), model_name(name, LONG)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    # long streams through a slow proxy take tens of seconds each at c=32
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        await _for(session, url, headers, short, EVENTS[SHORT], res, args.concurrency, args.warmup, None)
        res.errors = res.other_counts = 0
        for _ in range(args.requests):
            await one_stream(session, url, headers, short, EVENTS[SHORT], res, res.ttfb_c1_ms)
        streams, _, took = await _for(session, url, headers, short, EVENTS[SHORT], res, args.concurrency,
                                      args.duration, res.ttfb_busy_ms)
        res.short_rps = streams / took
        cpu0 = _cpu_seconds(pid)
        streams, events, took = await _for(session, url, headers, long, EVENTS[LONG], res, args.concurrency,
                                           args.duration, None)
        cpu = _cpu_seconds(pid) - cpu0
        res.long_rps, res.chunks_per_s = streams / took, events / took
        res.cpu_us_per_chunk = cpu / events * 1e6 if events and pid is not None else None
    return res


def report_streams(results: dict, concurrency: int) -> None:
    """The streamed table and the targets, from `results` (name -> relay_bench.Result with .streams)."""
    from bench.common import pct

    print(f"\nstreamed (include_usage; short = {EVENTS[SHORT]} events, long = {EVENTS[LONG]}):")
    print(f"{'target':<18}{'short/s':>9}{'long/s':>8}{'chunks/s':>10}{'TTFB c=1 p50/p99 ms':>22}"
          f"{f'TTFB c={concurrency} p50/p99':>22}{'CPU us/chunk':>14}{'errors':>8}{'re-chunked':>12}")
    for name, r in results.items():
        st = r.streams
        if r.skipped or st is None:
            continue
        cpu = f"{st.cpu_us_per_chunk:.1f}" if st.cpu_us_per_chunk is not None else "-"
        print(f"{name:<18}{st.short_rps:>9.1f}{st.long_rps:>8.1f}{st.chunks_per_s:>10.0f}"
              f"{pct(st.ttfb_c1_ms, 50):>12.2f} / {pct(st.ttfb_c1_ms, 99):<7.2f}"
              f"{pct(st.ttfb_busy_ms, 50):>12.2f} / {pct(st.ttfb_busy_ms, 99):<7.2f}{cpu:>14}{st.errors:>8}"
              f"{st.other_counts:>12}")

    relay, direct, proxy = (results.get(n) for n in ("policy-relay", "upstream direct", "litellm proxy"))
    if relay is None or relay.streams is None:
        return
    rs = relay.streams

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("\nstreaming targets (same run):")
    print(f"  chunks/s one process relays (long streams): {rs.chunks_per_s:,.0f}  (>= 15,000: "
          f"{verdict(rs.chunks_per_s >= 15_000)})")
    share = rs.short_rps / relay.rps if relay.rps else 0.0
    print(f"  short streams / non-streamed req/s, same process: {share:.2f}  (>= 0.60: {verdict(share >= 0.6)})")
    if direct is not None and direct.streams is not None:
        added = pct(rs.ttfb_c1_ms, 50) - pct(direct.streams.ttfb_c1_ms, 50)
        print(f"  time to first byte added at c=1, p50: {added:.2f} ms  (<= 2 ms: {verdict(added <= 2)})")
    if proxy is not None and proxy.streams is not None and not proxy.skipped:
        ratio = rs.short_rps / proxy.streams.short_rps if proxy.streams.short_rps else float("inf")
        long_ratio = rs.long_rps / proxy.streams.long_rps if proxy.streams.long_rps else float("inf")
        plain = relay.rps / proxy.rps if proxy.rps else float("inf")
        print(f"  streamed vs the LiteLLM proxy: short {ratio:.1f}x, long {long_ratio:.1f}x  (>= 6x: "
              f"{verdict(min(ratio, long_ratio) >= 6)})")
        print(f"  non-streamed vs the LiteLLM proxy: {plain:.1f}x  (>= 3x: {verdict(plain >= 3)})")
    two = results.get("policy-relay x2")
    if two is not None and two.streams is not None:
        print(f"  serve --workers 2: {two.streams.chunks_per_s:,.0f} chunks/s, {two.streams.short_rps:.0f} short "
              f"streams/s, {two.rps:.0f} non-streamed req/s ({two.streams.chunks_per_s / rs.chunks_per_s:.2f}x "
              "one worker's chunks/s)")
