"""Overload: does policy-relay refuse nothing while it keeps up, and refuse fast when it cannot? One gateway process,
default settings unless an option says otherwise, the fake upstream (tests/fake_upstream.py) behind it.

1. The "no false refusals" sweep: closed loops of --clients (1, 8, 32, 64, 128; and --many, 1,024, against the
   slow upstream) clients for --cell-seconds each, non-streamed and streamed (13 and 258 server-sent events), the
   upstream answering after 0, 50 and 2,000 ms, with Redis off and on; a refused client waits its retry-after-ms,
   as the openai SDKs do. Per cell: requests/s, refusals, the relay's CPU (user + system, in cores), the event
   loop's lag (p99 from relay_event_loop_lag_seconds, the largest tick seen), and whether a refusal was a false one:
   one in a cell where the relay's CPU stayed under 90% of a core and its loop lag under RELAY_LOOP_LAG_MS.
2. The 8× scenario: the capacity from --concurrency (64) closed-loop clients against a 50 ms upstream, then
   open-loop arrivals at 1×, 2×, 4× and 8× that rate (evenly spaced, none retried) for --duration seconds each,
   printing goodput, the share refused (503 `overloaded`), p50/p99 of the admitted requests and p99 of the refused
   answers; then two tenants, a quiet one at --quiet-share of capacity alone and beside the other offering 8×;
   then the baseline: the same 8× burst on a relay that never paces (RELAY_LOOP_LAG_MS=0: every request starts on
   arrival). The issue's targets at 8×: goodput ≥ 90% of the capacity, admitted p99 ≤ 3× admitted p50, refused
   p99 ≤ 20 ms; the quiet tenant's p99 ≤ 1.5× its unloaded p99.

The load comes from bench/loadgen.py (keep-alive connections on asyncio protocols): aiohttp's client costs
several times more CPU per request and, on a two-core machine, measured itself.

    python bench/overload_bench.py [--sweep-only | --burst-only] [--cell-seconds 4] [--clients 1,8,32,64,128]
                                   [--upstream-ms 0,50,2000] [--kinds plain,short,long] [--redis off,on]
                                   [--duration 10] [--max-inflight N] [--loop-lag-ms MS] [--queue-timeout-ms MS]
                                   [--env NAME=VALUE ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    Servers,
    admin_post,
    free_port,
    install_signal_handlers,
    pct,
    run,
    wait_ready,
)
from bench.loadgen import Pool, Tally, closed_loop, cpu_seconds, open_loop, post  # noqa: E402
from bench.relay_bench import BODY, MODEL  # noqa: E402
from bench.streams import EVENTS, LONG, SHORT, UPSTREAM_MODELS, stream_body  # noqa: E402
from relay.settings import DEFAULT_LOOP_LAG_MS  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"  # the relay's default (its keys carry the database's deployment id)
KINDS = {"plain": (MODEL, "plain"), "short": (SHORT, UPSTREAM_MODELS[SHORT]), "long": (LONG, UPSTREAM_MODELS[LONG])}
KIND_LABELS = {"plain": "non-streamed", "short": f"stream {EVENTS[SHORT]} ev", "long": f"stream {EVENTS[LONG]} ev"}


# --- the relay's own figures, from its /metrics ---------------------------------------------------------------

@dataclass
class Scrape:
    lag_buckets: dict[float, float] = field(default_factory=dict)  # le → cumulative count
    shed: dict[str, float] = field(default_factory=dict)  # reason → count
    limit: float = float("nan")
    pace: float = float("nan")


async def scrape(session: aiohttp.ClientSession, base: str) -> Scrape:
    out = Scrape()
    async with session.get(base + "/metrics") as r:
        for line in (await r.text()).splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("relay_event_loop_lag_seconds_bucket{"):
                out.lag_buckets[float(name.split('le="')[1].split('"')[0])] = float(value)
            elif name.startswith("relay_shed_requests_total{"):
                out.shed[name.split('"')[1]] = float(value)
            elif name == "relay_inflight_limit":
                out.limit = float(value)
            elif name.startswith("relay_start_rate_limit"):
                out.pace = float(value)
    return out


def lag_between(before: Scrape, after: Scrape, q: float) -> tuple[float, float]:
    """(the lag's q-quantile, the largest lag seen) in ms between two scrapes, as bucket upper bounds."""
    bounds = sorted(after.lag_buckets)
    counts = [after.lag_buckets[b] - before.lag_buckets.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if not total:
        return 0.0, 0.0
    quantile = next(b for b, c in zip(bounds, counts, strict=True) if c >= q * total)
    largest = next(b for b, c in zip(bounds, counts, strict=True) if c >= total)
    return quantile * 1000, largest * 1000


def shed_between(before: Scrape, after: Scrape) -> dict[str, int]:
    return {k: int(v - before.shed.get(k, 0.0)) for k, v in after.shed.items() if v - before.shed.get(k, 0.0)}


# --- relays ------------------------------------------------------------------------------------------------------

@dataclass
class Relay:
    base: str
    proc: Any
    pool: Pool
    keys: dict[str, str]
    port: int

    def request(self, tenant: str, body: bytes, path: str = "/v1/chat/completions") -> bytes:
        return post(path, f"127.0.0.1:{self.port}", {"Authorization": f"Bearer {self.keys[tenant]}"}, body)


async def start_relay(s: aiohttp.ClientSession, servers: Servers, args: argparse.Namespace, name: str,
                      upstreams: dict[int, str], redis_url: str, **env_extra: str) -> Relay:
    """A relay with tenants `bulk` and `quiet`, and per upstream delay a channel serving `<kind>-<ms>` models."""
    port, token = free_port(), secrets.token_hex(16)
    env = {"RELAY_DATABASE_URL": f"sqlite:///{servers.tmp / f'{name}.db'}", "RELAY_REDIS_URL": redis_url,
           "RELAY_ADMIN_TOKEN": token, "RELAY_PORT": str(port)}
    for var, value in (("RELAY_MAX_INFLIGHT", args.max_inflight), ("RELAY_LOOP_LAG_MS", args.loop_lag_ms),
                       ("RELAY_QUEUE_TIMEOUT_MS", args.queue_timeout_ms)):
        if value is not None:
            env[var] = str(value)
    env.update(dict(item.split("=", 1) for item in args.env))
    env.update(env_extra)
    base = f"http://127.0.0.1:{port}"
    proc = servers.start(name, [sys.executable, "-m", "admin.cli", "serve", "--log-level", "warning"], env)
    try:
        await wait_ready(s, base + "/health", proc, 60)
    except RuntimeError as exc:
        raise RuntimeError(f"policy-relay {exc}:\n{servers.log_tail(name)}") from exc
    admin = admin_post(s, base, token)
    keys = {}
    for tenant in ("bulk", "quiet"):
        made = await admin("/admin/tenants", {"name": tenant})
        keys[tenant] = (await admin("/admin/keys", {"tenant_id": made["id"], "name": tenant}))["key"]
    for ms, url in upstreams.items():
        mapping = {f"{kind}-{ms}": upstream_model for kind, (_, upstream_model) in KINDS.items()}
        if ms == 50:
            mapping[MODEL] = "plain"  # the 8× scenario's requests
        await admin("/admin/channels", {"name": f"fake-{ms}", "type": "openai", "base_url": url,
                                        "models": list(mapping), "model_mapping": mapping})
    return Relay(base, proc, Pool("127.0.0.1", port), keys, port)


def body_for(kind: str, ms: int) -> bytes:
    model = f"{kind}-{ms}"
    if kind == "plain":
        return json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    return stream_body(model)


# --- 1. the sweep --------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    redis: str
    ms: int
    kind: str
    clients: int
    tally: Tally
    cpu: float
    lag_p99_ms: float
    lag_max_ms: float
    shed: dict[str, int]

    @property
    def refused(self) -> int:
        return len(self.tally.shed_ms)

    def false_refusal(self, bound_ms: float) -> bool:
        return self.refused > 0 and self.cpu < 0.9 and self.lag_p99_ms < bound_ms

    def row(self, bound_ms: float) -> str:
        t = self.tally
        verdict = "FALSE REFUSALS" if self.false_refusal(bound_ms) else ("refused (busy)" if self.refused else "")
        return (f"| {self.redis:<5} | {self.ms:>5} | {KIND_LABELS[self.kind]:<14} | {self.clients:>3} | "
                f"{len(t.ok_ms) / t.seconds:7.0f} | {self.refused:>5} | {t.other:>3} | {self.cpu:4.2f} | "
                f"{pct(t.ok_ms, 50):7.1f} | {self.lag_p99_ms:5.1f} | {self.lag_max_ms:6.1f} | {verdict}")


async def sweep(args: argparse.Namespace, servers: Servers, s: aiohttp.ClientSession,
                upstreams: dict[int, str]) -> list[Cell]:
    bound_ms = float(args.loop_lag_ms if args.loop_lag_ms is not None else DEFAULT_LOOP_LAG_MS)
    cells: list[Cell] = []
    print(f"\n1. No false refusals: closed loops, {args.cell_seconds:g} s a cell (2,000 ms upstream: at least 3 "
          f"rounds); a refusal is false when CPU < 0.90 core and loop lag p99 < {bound_ms:g} ms\n")
    print("| Redis | upstream ms | kind | clients | req/s | refused | other | relay CPU | p50 ms | lag p99 ms "
          "| lag max ms | |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for redis in args.redis:
        relay = await start_relay(s, servers, args, f"sweep-{redis}", upstreams,
                                  REDIS_URL if redis == "on" else "none")
        for ms in args.upstream_ms:
            for kind in args.kinds:
                raw = relay.request("bulk", body_for(kind, ms))
                await closed_loop(relay.pool, raw, 2, 0.5 + ms / 1000)  # warm: connections, channel pool
                for clients in args.clients + ([args.many] if ms >= 1000 and args.many else []):
                    seconds = max(args.cell_seconds, 3.2 * ms / 1000)
                    before, c0 = await scrape(s, relay.base), cpu_seconds(relay.proc.pid)
                    tally = await closed_loop(relay.pool, raw, clients, seconds)
                    cpu = (cpu_seconds(relay.proc.pid) - c0) / tally.seconds
                    after = await scrape(s, relay.base)
                    cell = Cell(redis, ms, kind, clients, tally, cpu, *lag_between(before, after, 0.99),
                                shed_between(before, after))
                    cells.append(cell)
                    print(cell.row(bound_ms), flush=True)
        servers.stop(f"sweep-{redis}")
        relay.pool.close()
    false = [c for c in cells if c.false_refusal(bound_ms)]
    busy = [c for c in cells if c.refused and not c.false_refusal(bound_ms)]
    print(f"\n{len(cells)} cells: {len(false)} with false refusals, {len(busy)} with refusals at ≥ 0.90 core or lag "
          f"p99 ≥ {bound_ms:g} ms, {sum(c.refused for c in cells)} refusals in all")
    return cells


# --- 2. the 8× scenario --------------------------------------------------------------------------------------------

async def offered(relay: Relay, streams: list[tuple[bytes, float, Tally]], seconds: float) -> None:
    c0 = cpu_seconds(relay.proc.pid)
    await open_loop(relay.pool, streams, seconds)
    for _, _, tally in streams:
        tally.cpu = (cpu_seconds(relay.proc.pid) - c0) / seconds


async def burst(args: argparse.Namespace, servers: Servers, s: aiohttp.ClientSession,
                upstreams: dict[int, str]) -> None:
    relay = await start_relay(s, servers, args, "relay", upstreams, args.burst_redis)
    bulk, quiet = relay.request("bulk", BODY), relay.request("quiet", BODY)
    await closed_loop(relay.pool, bulk, args.concurrency, 2)  # warm-up
    c0 = cpu_seconds(relay.proc.pid)
    cap = await closed_loop(relay.pool, bulk, args.concurrency, args.duration)
    cap.cpu = (cpu_seconds(relay.proc.pid) - c0) / cap.seconds
    capacity = cap.goodput
    print(f"\n2. Overload: one gateway process, upstream 50 ms, RELAY_MAX_INFLIGHT={args.max_inflight or 'auto'}, "
          f"RELAY_LOOP_LAG_MS={args.loop_lag_ms or f'{DEFAULT_LOOP_LAG_MS} (default)'}, RELAY_QUEUE_TIMEOUT_MS="
          f"{args.queue_timeout_ms or '500 (default)'}, Redis {args.burst_redis}")
    print(cap.line(f"capacity (c={args.concurrency})", None))
    print(f"capacity: {capacity:.1f} requests/s\n")
    levels = {}
    state = await scrape(s, relay.base)
    for factor in (1, 2, 4, 8):
        levels[factor] = tally = Tally()
        await offered(relay, [(bulk, factor * capacity, tally)], args.duration)
        state, before = await scrape(s, relay.base), state
        lag_p99, lag_max = lag_between(before, state, 0.99)
        print(tally.line(f"{factor}x offered", capacity) + f"  loop lag p99 {lag_p99:g} ms max {lag_max:g} ms"
              f"  refused by reason {shed_between(before, state)}", flush=True)
    alone, with_burst, bursting = Tally(), Tally(), Tally()
    quiet_rate = max(1.0, args.quiet_share * capacity)
    await offered(relay, [(quiet, quiet_rate, alone)], args.duration)
    await offered(relay, [(quiet, quiet_rate, with_burst), (bulk, 8 * capacity, bursting)], args.duration)
    print(f"\nTwo tenants: quiet at {quiet_rate:.0f}/s, bulk at 8x capacity")
    print(alone.line("quiet alone", None))
    print(with_burst.line("quiet, bulk bursting", None))
    print(bursting.line("bulk bursting", capacity))
    servers.stop("relay")
    relay.pool.close()
    if not args.skip_unbounded:
        # The same 8x burst on a relay that starts everything on arrival (RELAY_LOOP_LAG_MS=0, no in-flight limit)
        unbounded = await start_relay(s, servers, args, "unbounded", upstreams, args.burst_redis,
                                      RELAY_LOOP_LAG_MS="0", RELAY_MAX_INFLIGHT="auto")
        bulk_u, quiet_u = unbounded.request("bulk", BODY), unbounded.request("quiet", BODY)
        await closed_loop(unbounded.pool, bulk_u, args.concurrency, 2)
        piled, quiet_piled, bulk_piled = Tally(), Tally(), Tally()
        await offered(unbounded, [(bulk_u, 8 * capacity, piled)], args.duration)
        await offered(unbounded, [(quiet_u, quiet_rate, quiet_piled), (bulk_u, 8 * capacity, bulk_piled)],
                      args.duration)
        print("\nBaseline in the same run: nothing paced, no in-flight limit (RELAY_LOOP_LAG_MS=0)")
        print(piled.line("8x offered", capacity))
        print(quiet_piled.line("quiet, bulk bursting", None))
        servers.stop("unbounded")
    report(levels, capacity, alone, with_burst)


def report(levels: dict[int, Tally], capacity: float, alone: Tally, with_burst: Tally) -> None:
    eight = levels[8]
    p50, p99 = pct(eight.ok_ms, 50), pct(eight.ok_ms, 99)
    checks = [
        ("goodput at 8x >= 90% of the capacity", eight.goodput / capacity, 0.9, ">="),
        ("admitted p99 / p50 at 8x <= 3", p99 / p50, 3.0, "<="),
        ("refused p99 at 8x <= 20 ms", pct(eight.shed_ms, 99), 20.0, "<="),
        ("quiet p99 bursting / alone <= 1.5", pct(with_burst.ok_ms, 99) / pct(alone.ok_ms, 99), 1.5, "<="),
    ]
    print(f"\ngoodput at 8x / at 1x: {eight.goodput / levels[1].goodput:.2f}")
    print("Targets:")
    for label, value, bound, op in checks:
        ok = value >= bound if op == ">=" else value <= bound
        print(f"  {'ok  ' if ok else 'MISS'} {label}: {value:.2f}")


async def bench(args: argparse.Namespace, servers: Servers) -> None:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        delays = sorted({*args.upstream_ms, 50}) if not args.burst_only else [50]
        upstreams = {}
        for ms in delays:
            upstreams[ms] = await servers.start_fake_upstream(s, free_port(), ms, name=f"upstream-{ms}")
        gc.collect()
        gc.freeze()
        gc.disable()  # this process's own collector pauses would show as the relay's latency (collected at the end)
        try:
            if not args.burst_only:
                await sweep(args, servers, s, upstreams)
            if not args.sweep_only:
                await burst(args, servers, s, upstreams)
        finally:
            gc.enable()


def _list(kind):
    return lambda raw: [kind(x) for x in raw.split(",") if x]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep-only", action="store_true", help="only the no-false-refusals sweep")
    parser.add_argument("--burst-only", action="store_true", help="only the 8x scenario")
    parser.add_argument("--cell-seconds", type=float, default=4.0, help="seconds per sweep cell")
    parser.add_argument("--clients", type=_list(int), default=[1, 8, 32, 64, 128])
    parser.add_argument("--many", type=int, default=1024,
                        help="and this many clients against upstreams of 1 s or more: thousands in flight (0: not)")
    parser.add_argument("--upstream-ms", type=_list(int), default=[0, 50, 2000])
    parser.add_argument("--kinds", type=_list(str), default=list(KINDS), help="plain, short, long")
    parser.add_argument("--redis", type=_list(str), default=["off", "on"], help="off, on (127.0.0.1:6379)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per 8x-scenario load level")
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients measuring capacity")
    parser.add_argument("--quiet-share", type=float, default=0.1, help="the quiet tenant's rate, × capacity")
    parser.add_argument("--burst-redis", default="none", help="RELAY_REDIS_URL in the 8x scenario (default: none)")
    parser.add_argument("--max-inflight", default=None, help="RELAY_MAX_INFLIGHT (default: the relay's, auto)")
    parser.add_argument("--loop-lag-ms", type=float, default=None, help="RELAY_LOOP_LAG_MS (default: the relay's)")
    parser.add_argument("--queue-timeout-ms", type=float, default=None, help="RELAY_QUEUE_TIMEOUT_MS")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="another setting for the relays (repeatable), e.g. RELAY_LOG_FLUSH_S=0.25")
    parser.add_argument("--skip-unbounded", action="store_true",
                        help="skip the baseline: the same 8x burst on a relay that never paces")
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
