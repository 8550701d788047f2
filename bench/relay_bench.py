"""Throughput and latency of policy-relay against a direct upstream and the LiteLLM proxy, in one run.

Three targets serve the same fast fake upstream (tests/fake_upstream.py), each measured the same way:
  (a) the upstream called directly, (b) policy-relay (1 worker), (c) the LiteLLM proxy (1 worker).
For each: requests/s at concurrency 32 for --duration seconds, and p50/p99 latency at concurrency 1
over --requests requests. policy-relay's own work is read from its `Server-Timing: relay;dur=...`
header. Then policy-relay alone: the same non-streamed request as /v1/messages and an /v1/embeddings call, their
overhead against chat's (bench/endpoints.py). All figures are ratios against baselines measured in the same run.

Run from the repository root with the project's venv:
    python bench/relay_bench.py [--duration 10] [--requests 300] [--skip-litellm-proxy]

The LiteLLM proxy needs `litellm[proxy]`, whose extras would move packages pinned by this project,
so it lives in its own venv:
    python3 -m venv .venv-proxy
    .venv-proxy/bin/pip install 'litellm[proxy]==1.106.2'
    LITELLM_PROXY_BIN=.venv-proxy python bench/relay_bench.py
The proxy is found via --litellm-proxy-cmd (a full command, e.g. ".venv-proxy/bin/litellm"),
else $LITELLM_PROXY_BIN (the `litellm` executable or a venv directory), else `litellm` on PATH.
If it cannot be found or started, (a) and (b) still run and the report says why (c) was skipped.
The proxy is given a generated master key (1.106.2 refuses to start without one), no database, telemetry
off, LITELLM_LOCAL_MODEL_COST_MAP=True and LITELLM_LOG=WARNING (no access log, like the relay's
--log-level warning); it runs under uvicorn with uvloop and --num_workers 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
    server_timing,
    wait_ready,
)
from bench.endpoints import EndpointResult, measure_endpoints, report_endpoints  # noqa: E402
from bench.streams import LONG, SHORT, UPSTREAM_MODELS, StreamResult, measure_streams, report_streams  # noqa: E402

MODEL = "bench-model"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}).encode()


@dataclass
class Target:
    name: str
    url: str  # the chat/completions URL
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    rps: float = 0.0
    lat_ms: list[float] = field(default_factory=list)
    relay_ms: list[float] = field(default_factory=list)  # Server-Timing relay;dur, if the target sends it
    upstream_ms: list[float] = field(default_factory=list)
    # client latency minus upstream;dur: everything but litellm's call, HTTP server and client included
    outside_ms: list[float] = field(default_factory=list)
    errors: int = 0
    skipped: str | None = None
    streams: StreamResult | None = None
    endpoints: dict[str, EndpointResult] | None = None  # policy-relay only: chat vs messages vs embeddings


async def one(session: aiohttp.ClientSession, target: Target, res: Result, timed: bool) -> bool:
    """One request; a non-200 answer or a transport failure counts as an error."""
    checkpoint()
    t0 = time.perf_counter()
    try:
        async with session.post(target.url, data=BODY, headers=target.headers) as r:
            await r.read()
            status, timing = r.status, r.headers.get("Server-Timing", "")
    except (aiohttp.ClientError, TimeoutError):
        status, timing = 0, ""
    if status != 200:
        res.errors += 1
        return False
    if timed:
        res.lat_ms.append((time.perf_counter() - t0) * 1000)
        durations = server_timing(timing)
        if "relay" in durations:
            res.relay_ms.append(durations["relay"])
        if "upstream" in durations:
            res.upstream_ms.append(durations["upstream"])
            res.outside_ms.append(res.lat_ms[-1] - durations["upstream"])
    return True


async def run_for(session: aiohttp.ClientSession, target: Target, res: Result, conc: int, seconds: float) -> int:
    """`conc` loops sending back to back until the deadline; returns the number of successful requests."""
    deadline = time.perf_counter() + seconds

    async def loop() -> int:
        ok = 0
        while time.perf_counter() < deadline:
            ok += await one(session, target, res, timed=False)
        return ok

    return sum(await asyncio.gather(*(loop() for _ in range(conc))))


async def measure(target: Target, args: argparse.Namespace, pid: int | None = None) -> Result:
    """Non-streamed: warm-up, latency at c=1, throughput at c=--concurrency over one keep-alive pool; then the
    streamed scenarios (bench.streams), with the CPU time of process `pid` and its children."""
    res = Result()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        await run_for(session, target, res, args.concurrency, args.warmup)
        res.errors = 0  # errors while warming up are not counted
        for _ in range(args.requests):
            await one(session, target, res, timed=True)
        t0 = time.perf_counter()
        done = await run_for(session, target, res, args.concurrency, args.duration)
        res.rps = done / (time.perf_counter() - t0)
    if not args.skip_streams:
        print(f"  streams: {target.name} ...", file=sys.stderr, flush=True)
        res.streams = await measure_streams(target.name, target.url, target.headers, args, pid)
    return res


async def setup_relay(session: aiohttp.ClientSession, base: str, token: str, upstream: str) -> str:
    """Tenant, key and channel through the admin API; returns the client key."""
    post = admin_post(session, base, token)

    tenant = await post("/admin/tenants", {"name": "bench"})
    key = (await post("/admin/keys", {"tenant_id": tenant["id"], "name": "bench"}))["key"]
    await post("/admin/channels", {"name": "fake", "type": "openai", "base_url": upstream,
                                   "models": [MODEL, SHORT, LONG], "model_mapping": UPSTREAM_MODELS})
    return key


async def check(session: aiohttp.ClientSession, target: Target) -> None:
    """One request must come back as a chat.completion from the fake upstream before we time anything."""
    async with session.post(target.url, data=BODY, headers=target.headers) as r:
        text = await r.text()
    if r.status != 200 or "Hello from bench-model" not in text:
        raise RuntimeError(f"smoke request failed: {r.status} {text[:300]}")


def proxy_command(args: argparse.Namespace) -> list[str] | None:
    if args.litellm_proxy_cmd:
        return shlex.split(args.litellm_proxy_cmd)
    env = os.environ.get("LITELLM_PROXY_BIN")
    if env:
        path = Path(env)
        return [str(path / "bin" / "litellm" if path.is_dir() else path)]
    found = shutil.which("litellm")
    return [found] if found else None


async def bench(args: argparse.Namespace, servers: Servers) -> dict[str, Result]:
    """(a), (b), (c) in turn against one fake upstream; only the target under test runs beside it."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        upstream = await servers.start_fake_upstream(s, free_port(), args.upstream_delay_ms)
        direct = Target("upstream direct", upstream + "/v1/chat/completions")
        await check(s, direct)
        print("measuring upstream direct ...", file=sys.stderr, flush=True)
        results = {direct.name: await measure(direct, args),
                   "policy-relay": await bench_relay(args, servers, s, upstream, workers=1)}
        if args.relay_workers_2:
            results["policy-relay x2"] = await bench_relay(args, servers, s, upstream, workers=2)
        cmd = None if args.skip_litellm_proxy else proxy_command(args)
        if args.skip_litellm_proxy:
            results["litellm proxy"] = Result(skipped="--skip-litellm-proxy given")
        elif cmd is None:
            results["litellm proxy"] = Result(skipped="no `litellm` found (--litellm-proxy-cmd, LITELLM_PROXY_BIN)")
        else:
            results["litellm proxy"] = await bench_proxy(args, servers, s, cmd, upstream)
    return results


async def bench_relay(args: argparse.Namespace, servers: Servers, s: aiohttp.ClientSession, upstream: str,
                      workers: int) -> Result:
    port, token = free_port(), secrets.token_hex(16)
    env = {"RELAY_DATABASE_URL": f"sqlite:///{servers.tmp / f'bench-{workers}.db'}", "RELAY_REDIS_URL": "none",
           "RELAY_ADMIN_TOKEN": token, "RELAY_PORT": str(port)}
    base = f"http://127.0.0.1:{port}"
    proc = servers.start("relay", [sys.executable, "-m", "admin.cli", "serve", "--workers", str(workers),
                                   "--log-level", "warning"], env)
    try:
        await wait_ready(s, base + "/health", proc, 60)
    except RuntimeError as exc:
        raise RuntimeError(f"policy-relay {exc}:\n{servers.log_tail('relay')}") from exc
    key = await setup_relay(s, base, token, upstream)
    relay = Target("policy-relay", base + "/v1/chat/completions", {"Authorization": f"Bearer {key}"})
    await check(s, relay)
    print(f"measuring policy-relay ({workers} worker{'s' if workers > 1 else ''}) ...", file=sys.stderr, flush=True)
    result = await measure(relay, args, proc.pid)
    if workers == 1 and not args.skip_endpoints:
        print("  endpoints: chat, messages, embeddings ...", file=sys.stderr, flush=True)
        result.endpoints = await measure_endpoints(base, key, MODEL, args)
    servers.stop("relay")
    return result


async def bench_proxy(args: argparse.Namespace, servers: Servers, s: aiohttp.ClientSession, cmd: list[str],
                      upstream: str) -> Result:
    port, master = free_port(), "sk-bench-" + secrets.token_hex(16)
    config = {"model_list": [{"model_name": name, "litellm_params": {
                  "model": f"openai/{UPSTREAM_MODELS.get(name, name)}", "api_base": upstream + "/v1",
                  "api_key": "none"}} for name in (MODEL, SHORT, LONG)],
              "general_settings": {"master_key": master},  # no database_url: keys are not looked up in a DB
              "litellm_settings": {"telemetry": False}}
    cfg = servers.tmp / "litellm.yaml"
    cfg.write_text(json.dumps(config, indent=2))  # JSON is YAML
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False", "LITELLM_LOG": "WARNING"}
    try:
        proc = servers.start("litellm", [*cmd, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                                         "--num_workers", "1"], env)
    except OSError as exc:
        return Result(skipped=f"could not run {shlex.join(cmd)}: {exc}")
    proxy = Target("litellm proxy", f"http://127.0.0.1:{port}/v1/chat/completions",
                   {"Authorization": f"Bearer {master}"})
    try:
        await wait_ready(s, f"http://127.0.0.1:{port}/health/liveliness", proc, 120)
        await check(s, proxy)
    except (RuntimeError, aiohttp.ClientError) as exc:
        servers.stop("litellm")
        return Result(skipped=f"{shlex.join(cmd)} did not start: {exc}\n{servers.log_tail('litellm')}")
    print("measuring litellm proxy ...", file=sys.stderr, flush=True)
    result = await measure(proxy, args, proc.pid)
    servers.stop("litellm")
    return result


def report(results: dict[str, Result], args: argparse.Namespace) -> None:
    print(f"\npolicy-relay benchmark: fake upstream delay {args.upstream_delay_ms:g} ms, {os.cpu_count()} CPUs, "
          f"load generator in-process (aiohttp)")
    print(f"  throughput: c={args.concurrency} for {args.duration:g}s; latency: c=1 over {args.requests} requests\n")
    print(f"{'target':<18}{'req/s @c=' + str(args.concurrency):>14}{'p50 ms @c=1':>14}{'p99 ms @c=1':>14}"
          f"{'errors':>8}")
    for name, r in results.items():
        if r.skipped:
            print(f"{name:<18}{'skipped':>14}")
            continue
        print(f"{name:<18}{r.rps:>14.1f}{pct(r.lat_ms, 50):>14.2f}{pct(r.lat_ms, 99):>14.2f}{r.errors:>8}")

    relay, direct, proxy = results["policy-relay"], results["upstream direct"], results["litellm proxy"]
    print("\npolicy-relay Server-Timing at c=1 (ms):")
    if relay.relay_ms:
        print(f"  relay;dur     p50 {pct(relay.relay_ms, 50):7.3f}   p99 {pct(relay.relay_ms, 99):7.3f}"
              f"   ({len(relay.relay_ms)} responses)")
        print(f"  upstream;dur  p50 {pct(relay.upstream_ms, 50):7.3f}   p99 {pct(relay.upstream_ms, 99):7.3f}")
        own = [o - pct(direct.lat_ms, 50) for o in relay.outside_ms]
        print(f"  relay's own work incl. its HTTP server (latency - upstream;dur - direct p50): "
              f"p50 {pct(own, 50):.3f}   p99 {pct(own, 99):.3f}   (target p50 < 1.5)")
    else:
        print("  no Server-Timing header with relay;dur in the responses")

    d50 = pct(direct.lat_ms, 50)
    print("\nratios (same run):")
    if proxy.skipped:
        print(f"  litellm proxy skipped: {proxy.skipped}")
    else:
        ratio = relay.rps / proxy.rps if proxy.rps else float("inf")
        verdict = "met" if ratio >= 2.5 else "NOT met"
        print(f"  policy-relay / litellm proxy req/s:    {ratio:.2f}x  (target >= 2.5x: {verdict})")
        print(f"  litellm proxy / upstream direct req/s: {proxy.rps / direct.rps:.3f}x")
    print(f"  policy-relay / upstream direct req/s:  {relay.rps / direct.rps:.3f}x")
    added = [f"policy-relay +{pct(relay.lat_ms, 50) - d50:.2f} ms"]
    if not proxy.skipped:
        added.append(f"litellm proxy +{pct(proxy.lat_ms, 50) - d50:.2f} ms")
    print("  p50 latency added over upstream direct: " + ", ".join(added))
    if not args.skip_streams:
        report_streams(results, args.concurrency)
    if relay.endpoints:
        report_endpoints(relay.endpoints, args.concurrency)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run (default 10)")
    parser.add_argument("--requests", type=int, default=300, help="requests per c=1 latency run (default 300)")
    parser.add_argument("--concurrency", type=int, default=32, help="connections for throughput (default 32)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per target (default 2)")
    parser.add_argument("--upstream-delay-ms", type=float, default=0.0, help="fake upstream delay (default 0)")
    parser.add_argument("--skip-litellm-proxy", action="store_true", help="measure only (a) and (b)")
    parser.add_argument("--litellm-proxy-cmd", help='command that runs the proxy, e.g. "/venv/bin/litellm"')
    parser.add_argument("--skip-streams", action="store_true", help="only the non-streamed scenario")
    parser.add_argument("--skip-endpoints", action="store_true", help="no /v1/messages and /v1/embeddings scenario")
    parser.add_argument("--relay-workers-2", action="store_true", help="also measure `serve --workers 2`")
    args = parser.parse_args()

    install_signal_handlers()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        servers = Servers(Path(tmp))
        try:
            results = run(bench(args, servers))
        except RuntimeError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            servers.stop_all()
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
