"""Overload: policy-relay from 1× to 8× its measured capacity, and one tenant bursting beside a quiet one.

One gateway process (`serve`, SQLite, no Redis unless --redis-url) in front of the fake upstream
(tests/fake_upstream.py) answering in --upstream-delay-ms (50). First the capacity: non-streamed chat requests
from --concurrency closed-loop clients for --duration seconds (the 200s per second). Then open-loop arrivals at
1×, 2×, 4× and 8× that rate (evenly spaced, none retried), each for --duration seconds, printing goodput, the
share refused (503 `overloaded`), p50/p99 of the admitted requests and p99 of the refused answers. Last, two
tenants: the quiet one sends --quiet-share of capacity alone (its unloaded p99), then again while the bulk
tenant sends 8× capacity. Then the baseline: the same 8× burst, alone and beside the quiet tenant, on a relay
with no in-flight limit (what the relay did before admission control). All ratios are against figures of the
same run. The issue's targets at 8×: goodput ≥ 90% of the capacity measured at 1× (the 1× level's goodput; the
ratio to the closed-loop figure is printed too), admitted p99 ≤ 3× admitted p50 and ≤ 1 s, refused p99 ≤ 20 ms,
the quiet tenant's p99 ≤ 1.5× its unloaded p99.

The load comes from bench/loadgen.py (keep-alive connections on asyncio protocols): aiohttp's client costs
several times more CPU per request and, on a two-core machine, measured itself.

    python bench/overload_bench.py [--duration 10] [--max-inflight N|auto] [--queue-timeout-ms MS]
                                   [--redis-url URL] [--skip-unbounded]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    Servers,
    admin_post,
    checkpoint,
    free_port,
    install_signal_handlers,
    pct,
    run,
    wait_ready,
)
from bench.loadgen import Pool, post  # noqa: E402
from bench.relay_bench import BODY, MODEL  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Tally:
    ok_ms: list[float] = field(default_factory=list)
    shed_ms: list[float] = field(default_factory=list)
    other: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # the relay's CPU seconds per second meanwhile
    started: float = 0.0
    last_done: float = 0.0  # when the last answer came: a piled-up relay answers long after the arrivals stop

    @property
    def goodput(self) -> float:
        return len(self.ok_ms) / max(self.seconds, self.last_done - self.started, 1e-9)

    @property
    def sent(self) -> int:
        return len(self.ok_ms) + len(self.shed_ms) + self.other

    def line(self, label: str, capacity: float | None) -> str:
        goodput = self.goodput
        shed = len(self.shed_ms) / self.sent if self.sent else 0.0
        ratio = f" ({goodput / capacity:4.0%} of capacity)" if capacity else ""
        return (f"{label:<22} sent {self.sent:6d}  goodput {goodput:7.1f}/s{ratio}  refused {shed:6.1%}  "
                f"other {self.other:4d}  admitted p50 {pct(self.ok_ms, 50):7.1f} ms p99 {pct(self.ok_ms, 99):7.1f} ms"
                f"  refused p99 {pct(self.shed_ms, 99):6.1f} ms  relay CPU {self.cpu:4.0%}")


async def one(pool: Pool, raw: bytes, tally: Tally) -> None:
    answer, seconds = await pool.request(raw)
    tally.last_done = time.perf_counter()
    status, head = answer or (0, b"")
    if status == 200:
        tally.ok_ms.append(seconds * 1000)
    elif status == 503 and b"\r\nretry-after:" in head:
        tally.shed_ms.append(seconds * 1000)
    else:
        tally.other += 1


async def closed_loop(pool: Pool, raw: bytes, clients: int, seconds: float) -> Tally:
    tally, deadline = Tally(), time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            checkpoint()
            await one(pool, raw, tally)

    t0 = tally.started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    tally.seconds = time.perf_counter() - t0
    return tally


async def open_loop(pool: Pool, streams: list[tuple[bytes, float, Tally]], seconds: float) -> None:
    """Arrivals at fixed rates (per stream: the request, requests/s, its tally) for `seconds`; waits for the last."""
    tasks: set[asyncio.Task] = set()

    async def arrivals(raw: bytes, rate: float, tally: Tally) -> None:
        t0 = tally.started = time.perf_counter()
        n = 0
        while (due := t0 + n / rate) < t0 + seconds:
            checkpoint()
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(pool, raw, tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        tally.seconds = seconds

    await asyncio.gather(*(arrivals(*s) for s in streams))
    while tasks:
        await asyncio.gather(*list(tasks))


async def relay_state(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The relay's in-flight limit and refusals by reason so far, from its /metrics."""
    out = {}
    async with session.get(base + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("relay_inflight_limit "):
                out["limit"] = float(line.split()[1])
            elif line.startswith("relay_shed_requests_total{"):
                out[line.split('"')[1]] = float(line.split()[-1])
    return out


def state_line(before: dict[str, float], after: dict[str, float]) -> str:
    """The limit now, and the refusals meanwhile: at once / after waiting their turn."""
    delta = {k: int(after.get(k, 0) - before.get(k, 0)) for k in ("overloaded", "queue_timeout", "client_gone")}
    return (f"  limit {after.get('limit', 0):.0f}  refused at once {delta['overloaded']}, "
            f"after waiting {delta['queue_timeout']}")


async def setup(session: aiohttp.ClientSession, base: str, token: str, upstream: str) -> dict[str, str]:
    post = admin_post(session, base, token)

    keys = {}
    for name in ("bulk", "quiet"):
        tenant = await post("/admin/tenants", {"name": name})
        keys[name] = (await post("/admin/keys", {"tenant_id": tenant["id"], "name": name}))["key"]
    await post("/admin/channels", {"name": "fake", "type": "openai", "base_url": upstream, "models": [MODEL]})
    return keys


@dataclass
class Relay:
    base: str
    proc: Any
    pool: Pool
    bulk: bytes  # the two tenants' prepared requests
    quiet: bytes


async def start_relay(s: aiohttp.ClientSession, servers: Servers, args: argparse.Namespace, upstream: str, name: str,
                      max_inflight: str | None) -> Relay:
    port, token = free_port(), secrets.token_hex(16)
    env = {"RELAY_DATABASE_URL": f"sqlite:///{servers.tmp / f'{name}.db'}", "RELAY_REDIS_URL": args.redis_url,
           "RELAY_ADMIN_TOKEN": token, "RELAY_PORT": str(port)}
    if max_inflight:
        env["RELAY_MAX_INFLIGHT"] = max_inflight
    if args.queue_timeout_ms is not None:
        env["RELAY_QUEUE_TIMEOUT_MS"] = str(args.queue_timeout_ms)
    base = f"http://127.0.0.1:{port}"
    proc = servers.start(name, [sys.executable, "-m", "admin.cli", "serve", "--log-level", "warning"], env)
    try:
        await wait_ready(s, base + "/health", proc, 60)
    except RuntimeError as exc:
        raise RuntimeError(f"policy-relay {exc}:\n{servers.log_tail(name)}") from exc
    keys = await setup(s, base, token, upstream)
    bulk, quiet = (post("/v1/chat/completions", f"127.0.0.1:{port}", {"Authorization": f"Bearer {keys[n]}"}, BODY)
                   for n in ("bulk", "quiet"))
    relay = Relay(base, proc, Pool("127.0.0.1", port), bulk, quiet)
    # Warm-up, until the in-flight limit (by default measured by the relay itself) holds still for 3 s
    history: list[float] = []
    while len(history) < 4 or len(set(history[-4:])) > 1 and len(history) < 30:
        await closed_loop(relay.pool, bulk, args.concurrency, 1)
        history.append((await relay_state(s, base)).get("limit", 0))
    return relay


async def offered(relay: Relay, streams: list[tuple[bytes, float, Tally]], seconds: float) -> None:
    c0 = cpu_seconds(relay.proc.pid)
    await open_loop(relay.pool, streams, seconds)
    for _, _, tally in streams:
        tally.cpu = (cpu_seconds(relay.proc.pid) - c0) / seconds


async def bench(args: argparse.Namespace, servers: Servers) -> None:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        upstream = await servers.start_fake_upstream(s, free_port(), args.upstream_delay_ms)
        relay = await start_relay(s, servers, args, upstream, "relay", args.max_inflight)
        gc.collect()
        gc.freeze()
        gc.disable()  # this process's own collector pauses would show as the relay's latency (collected at the end)
        c0 = cpu_seconds(relay.proc.pid)
        cap = await closed_loop(relay.pool, relay.bulk, args.concurrency, args.duration)
        cap.cpu = (cpu_seconds(relay.proc.pid) - c0) / cap.seconds
        capacity = cap.goodput
        print(f"\nOverload: one gateway process, upstream {args.upstream_delay_ms:.0f} ms, "
              f"RELAY_MAX_INFLIGHT={args.max_inflight or 'auto (default)'}, RELAY_QUEUE_TIMEOUT_MS="
              f"{args.queue_timeout_ms if args.queue_timeout_ms is not None else '500 (default)'}")
        print(cap.line(f"capacity (c={args.concurrency})", None))
        state = await relay_state(s, relay.base)
        print(f"capacity: {capacity:.1f} requests/s, in-flight limit {state.get('limit', 0):.0f}\n")
        levels = {}
        for factor in (1, 2, 4, 8):
            levels[factor] = tally = Tally()
            await offered(relay, [(relay.bulk, factor * capacity, tally)], args.duration)
            state, before = await relay_state(s, relay.base), state
            print(tally.line(f"{factor}x offered", capacity) + state_line(before, state), flush=True)
        alone, with_burst, burst = Tally(), Tally(), Tally()
        quiet_rate = max(1.0, args.quiet_share * capacity)
        await offered(relay, [(relay.quiet, quiet_rate, alone)], args.duration)
        await offered(relay, [(relay.quiet, quiet_rate, with_burst), (relay.bulk, 8 * capacity, burst)], args.duration)
        print(f"\nTwo tenants: quiet at {quiet_rate:.0f}/s, bulk at 8x capacity")
        print(alone.line("quiet alone", None))
        print(with_burst.line("quiet, bulk bursting", None))
        state, before = await relay_state(s, relay.base), state
        print(burst.line("bulk bursting", capacity) + state_line(before, state))
        servers.stop("relay")
        if not args.skip_unbounded:
            # The same 8x burst on a relay that takes everything (the behaviour before admission control)
            unbounded = await start_relay(s, servers, args, upstream, "unbounded", "1000000")
            piled, quiet_piled, bulk_piled = Tally(), Tally(), Tally()
            await offered(unbounded, [(unbounded.bulk, 8 * capacity, piled)], args.duration)
            await offered(unbounded, [(unbounded.quiet, quiet_rate, quiet_piled),
                                      (unbounded.bulk, 8 * capacity, bulk_piled)], args.duration)
            print("\nBaseline in the same run: no in-flight limit (RELAY_MAX_INFLIGHT=1000000)")
            print(piled.line("8x offered", capacity))
            print(quiet_piled.line("quiet, bulk bursting", None))
            servers.stop("unbounded")
        gc.enable()
        report(levels, capacity, alone, with_burst)


def report(levels: dict[int, Tally], capacity: float, alone: Tally, with_burst: Tally) -> None:
    eight = levels[8]
    p50, p99 = pct(eight.ok_ms, 50), pct(eight.ok_ms, 99)
    checks = [
        ("goodput at 8x >= 90% of the capacity measured at 1x", eight.goodput / levels[1].goodput, 0.9, ">="),
        ("admitted p99 / p50 at 8x <= 3", p99 / p50, 3.0, "<="),
        ("admitted p99 at 8x <= 1000 ms", p99, 1000.0, "<="),
        ("refused p99 at 8x <= 20 ms", pct(eight.shed_ms, 99), 20.0, "<="),
        ("quiet p99 bursting / alone <= 1.5", pct(with_burst.ok_ms, 99) / pct(alone.ok_ms, 99), 1.5, "<="),
    ]
    print(f"\ngoodput at 8x / the closed-loop capacity: {eight.goodput / capacity:.2f}")
    print("Targets:")
    for label, value, bound, op in checks:
        ok = value >= bound if op == ">=" else value <= bound
        print(f"  {'ok  ' if ok else 'MISS'} {label}: {value:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load level")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients measuring capacity")
    parser.add_argument("--upstream-delay-ms", type=float, default=50.0)
    parser.add_argument("--quiet-share", type=float, default=0.1, help="the quiet tenant's rate, × capacity")
    parser.add_argument("--max-inflight", default=None, help="RELAY_MAX_INFLIGHT (default: the relay's, auto)")
    parser.add_argument("--queue-timeout-ms", type=float, default=None, help="RELAY_QUEUE_TIMEOUT_MS")
    parser.add_argument("--redis-url", default="none", help="RELAY_REDIS_URL for the relay (default: none)")
    parser.add_argument("--skip-unbounded", action="store_true",
                        help="skip the baseline: the same 8x burst on a relay with no in-flight limit")
    args = parser.parse_args()
    install_signal_handlers()
    with tempfile.TemporaryDirectory() as tmp:
        servers = Servers(Path(tmp))
        try:
            run(bench(args, servers))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            servers.stop_all()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    sys.exit(main())
