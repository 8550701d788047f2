"""The relay's cost against the size of its catalog, in one run: an empty catalog, then 10,000 keys with 1,000
policies and 1,000 channels, then 100,000 keys with 10,000 policies and 1,000 channels.

Each catalog is built on a fresh SQLite database through the admin API — keys by POST /admin/keys/batch, a
thousand at a time; channels and policies by one POST /admin/import — none of which matches the request being
measured (half the policies are exact names, half globs). Then, with two gateway processes (`serve`) on that
database and Redis, it prints:
  - the relay's own work per request (`Server-Timing: relay`), p50 and p99 over --requests requests, and its
    ratio to the empty catalog's;
  - one admin write (POST /admin/keys: the write and this process's reload), p50 over 30;
  - the time until the second process refuses a key revoked through the first, p50 and worst of 5;
  - the first process's resident memory after the requests, and the time from its start until /health/ready
    (most of it importing litellm and the app, the same at any size), and of that the catalog's full read.

Run from the repository root with the project's venv:
    python bench/catalog_bench.py [--requests 1000] [--redis-url redis://127.0.0.1:6379/11] [--quick]
--quick builds 10x smaller catalogs (a minute instead of several). Redis DB 11 is flushed first.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Servers, free_port, install_signal_handlers, pct, run, server_timing, wait_ready  # noqa: E402

ADMIN_TOKEN = "bench-admin"
A = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TARGETS = {"ratio": 1.2, "write_ms": 20.0, "revoke_s": 1.0, "rss_mb": 300.0, "startup_s": 5.0}


async def call(s: aiohttp.ClientSession, method: str, url: str, body: object = None, headers: dict | None = None):
    async with s.request(method, url, json=body, headers=headers or A) as r:
        data = await r.json(content_type=None)
        if r.status >= 300:
            raise RuntimeError(f"{method} {url}: {r.status} {str(data)[:300]}")
        return data


async def build(s: aiohttp.ClientSession, base: str, upstream: str, keys: int, policies: int, channels: int) -> str:
    """The measured channel, policy and key, and the filler around them; the measured key's secret."""
    await call(s, "POST", base + "/admin/import", {
        "channels": [{"name": "measured", "type": "openai", "base_url": upstream, "models": ["bench-model"]}]
        + [{"name": f"filler-{i}", "type": "openai", "base_url": upstream, "models": [f"filler-{i}"]}
           for i in range(channels)],
        "policies": [{"model_pattern": "bench-*", "rules": {"temperature": {"min": 0.1, "default": 0.7}}}]
        + [{"model_pattern": f"other-{i}" if i % 2 else f"family-{i}-*", "rules": {"top_p": {"min": 0.01}}}
           for i in range(policies)]})
    tenant = await call(s, "POST", base + "/admin/tenants", {"name": "measured"})
    filler = await call(s, "POST", base + "/admin/tenants", {"name": "filler"})
    for done in range(0, keys, 1000):
        await call(s, "POST", base + "/admin/keys/batch",
                   {"tenant_id": filler["id"], "count": min(1000, keys - done), "name": "filler"})
    return (await call(s, "POST", base + "/admin/keys", {"tenant_id": tenant["id"], "name": "measured"}))["key"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def own_work(s: aiohttp.ClientSession, base: str, key: str, n: int) -> list[float]:
    body = {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    out = []
    for i in range(n + 200):  # the first 200 warm up
        async with s.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"chat: {r.status}")
            if i >= 200:
                out.append(server_timing(r.headers.get("Server-Timing", "")).get("relay", float("nan")))
    return out


def catalog_load_s(database_url: str) -> tuple[float, int]:
    """What startup spends on the catalog: one full read, as `serve` does before it answers (best of 3)."""
    from relay.catalog import load_snapshot
    from relay.db import make_engine
    from relay.secrets import resolve_box

    engine = make_engine(database_url)
    box = resolve_box(database_url)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        snapshot = load_snapshot(engine, box)
        times.append(time.perf_counter() - t0)
    engine.dispose()
    return min(times), len(snapshot.keys_by_hash)


async def revocation_s(s: aiohttp.ClientSession, a: str, b: str, tenant_id: int) -> float:
    """Revoked through A: how long until B refuses the key."""
    made = await call(s, "POST", a + "/admin/keys", {"tenant_id": tenant_id, "name": "revoked"})
    auth = {"Authorization": f"Bearer {made['key']}"}
    deadline = time.monotonic() + 10
    while True:  # B must know the key first
        async with s.get(b + "/v1/models", headers=auth) as r:
            if r.status == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError("B never accepted the new key")
        await asyncio.sleep(0.01)
    start = time.monotonic()
    await call(s, "DELETE", a + f"/admin/keys/{made['id']}")
    while time.monotonic() - start < 10:
        async with s.get(b + "/v1/models", headers=auth) as r:
            if r.status == 401:
                return time.monotonic() - start
        await asyncio.sleep(0.005)
    return float("inf")


async def scenario(servers: Servers, s: aiohttp.ClientSession, upstream: str, redis_url: str, name: str,
                   size: tuple[int, int, int], requests: int) -> dict[str, float]:
    db = servers.tmp / f"{name.split()[0]}.db"
    env = {"RELAY_DATABASE_URL": f"sqlite:///{db}", "RELAY_REDIS_URL": redis_url, "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
           "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    serve = [sys.executable, "-m", "admin.cli", "serve", "--log-level", "warning", "--port"]
    ports = free_port(), free_port()
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    proc = servers.start("build", serve + [str(ports[0])], env)
    await wait_ready(s, a + "/health/ready", proc, 120)
    key = await build(s, a, upstream, *size)
    servers.stop("build")
    started = time.monotonic()
    proc = servers.start("a", serve + [str(ports[0])], env)
    await wait_ready(s, a + "/health/ready", proc, 120)
    startup = time.monotonic() - started
    other = servers.start("b", serve + [str(ports[1])], env)
    await wait_ready(s, b + "/health/ready", other, 120)
    work = await own_work(s, a, key, requests)
    tenant = (await call(s, "GET", a + "/admin/tenants?q=measured"))[0]["id"]
    writes = []
    for i in range(30):
        t0 = time.perf_counter()
        await call(s, "POST", a + "/admin/keys", {"tenant_id": tenant, "name": f"w{i}"})
        writes.append((time.perf_counter() - t0) * 1000)
    revokes = [await revocation_s(s, a, b, tenant) for _ in range(5)]
    result = {"p50": pct(work, 50), "p99": pct(work, 99), "write_ms": pct(writes, 50), "revoke_s": pct(revokes, 50),
              "revoke_max_s": max(revokes), "rss_mb": rss_mb(proc.pid), "startup_s": startup}
    servers.stop("a")
    servers.stop("b")
    result["load_s"], result["keys"] = catalog_load_s(env["RELAY_DATABASE_URL"])
    return result


async def main(args: argparse.Namespace) -> None:
    scale = 10 if args.quick else 1
    sizes = {"empty": (0, 0, 0), f"{10_000 // scale:,} keys, {1_000 // scale:,} policies":
             (10_000 // scale, 1_000 // scale, 1_000 // scale),
             f"{100_000 // scale:,} keys, {10_000 // scale:,} policies": (100_000 // scale, 10_000 // scale,
                                                                          1_000 // scale)}
    if args.redis_url != "none":
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()
    servers = Servers(Path(tempfile.mkdtemp(prefix="catalog-bench-")))
    results = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            upstream = await servers.start_fake_upstream(s, free_port(), 0)
            for name, size in sizes.items():
                print(f"building and measuring: {name} ({size[2]:,} channels) ...", file=sys.stderr, flush=True)
                results[name] = await scenario(servers, s, upstream, args.redis_url, name, size, args.requests)
    finally:
        servers.stop_all()
    base = results["empty"]["p50"]
    print(f"\n{'catalog':<30} {'own p50':>8} {'own p99':>8} {'ratio':>6} {'write p50':>10} {'revoke p50/max':>15} "
          f"{'RSS':>8} {'startup':>8} {'of it, catalog':>15}")
    for name, r in results.items():
        print(f"{name:<30} {r['p50']:>6.3f}ms {r['p99']:>6.3f}ms {r['p50'] / base:>5.2f}x {r['write_ms']:>8.1f}ms "
              f"{r['revoke_s']:>7.3f}/{r['revoke_max_s']:.3f}s {r['rss_mb']:>6.0f}MB {r['startup_s']:>7.2f}s "
              f"{r['load_s']:>7.2f}s ({r['keys']:,} keys)")
    t = TARGETS
    print(f"\ntargets at the largest catalog: own-work ratio <= {t['ratio']}x, admin write <= {t['write_ms']:.0f} ms, "
          f"revocation <= {t['revoke_s']:.0f} s, RSS <= {t['rss_mb']:.0f} MB, startup <= {t['startup_s']:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    parser.add_argument("--quick", action="store_true")
    install_signal_handlers()
    run(main(parser.parse_args()))
