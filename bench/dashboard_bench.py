"""The dashboard at catalog and log scale: every page's first load in Debian's Chromium, the admin endpoints
it calls, and the JavaScript it ships.

A fresh relay (SQLite by default, or --database-url) gets 500 keys through the admin API and --rows
request-log rows (100,000 by default, spread over the last day; written straight into the table with their
rollup, as the relay's log writer does), then each page is opened in a new tab, signed in, and timed until its content
is shown (nothing marked aria-busy is left). Targets: every page under 1 s on 127.0.0.1, total JS under
300 KB.

    .venv/bin/python bench/dashboard_bench.py [--rows 100000] [--keys 500] [--database-url URL] [--screenshots DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import create_engine, insert

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from relay.models import RequestLog  # noqa: E402
from relay.rollup import add_stats  # noqa: E402
from tests.net import free_port, stop, wait_healthy  # noqa: E402

TOKEN = "bench-admin"
PAGES = ("overview", "channels", "tenants", "policies", "requests", "cache", "audit")
DASHBOARD = ROOT / "admin" / "dashboard"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def seed_logs(database_url: str, rows: int, tenants: list[int], keys: list[int], channels: list[int]) -> float:
    engine = create_engine(database_url)
    now = datetime.now(UTC)
    rng = random.Random(7)
    models = ["qwen2.5-7b", "qwen1.5-7b", "gpt-4o-mini", "smollm2-135m", "claude-3-5-haiku"]
    started = time.perf_counter()
    with engine.begin() as conn:
        for start in range(0, rows, 10_000):
            batch = []
            for i in range(start, min(rows, start + 10_000)):
                status = 200 if rng.random() > 0.03 else rng.choice((400, 429, 502))
                prompt, completion = rng.randint(5, 800), rng.randint(1, 400)
                batch.append({
                    "created_at": now - timedelta(seconds=86_400 * (rows - i) / rows), "tenant_id": rng.choice(tenants),
                    "key_id": rng.choice(keys), "endpoint": "chat", "model": rng.choice(models),
                    "upstream_model": None, "channel_id": rng.choice(channels), "stream": rng.random() < 0.6,
                    "status_code": status, "error_type": None if status == 200 else "upstream_error",
                    "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                    "latency_ms": rng.lognormvariate(6, 1), "cache": rng.choice(("hit", "miss", "bypass")),
                    "policy": "1@1" if rng.random() < 0.4 else None,
                    "rewrites": [{"param": "temperature", "from": 0, "to": 0.5, "rule": "temperature.min"}]
                    if rng.random() < 0.2 else None})
            conn.execute(insert(RequestLog.__table__), batch)
            add_stats(conn, batch)  # as the relay's log writer does
    engine.dispose()
    return time.perf_counter() - started


def timed_get(client: httpx.Client, path: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = client.get(path)
        r.raise_for_status()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


# In the page: the moment (ms from navigation start) the page shows its content — its heading is there, an
# admin API answer has arrived, and nothing is marked aria-busy any more.
READY_PROBE = """
window.__ready = null;
(function check() {
  if (document.querySelector('main h1') && !document.querySelector('[aria-busy="true"]')
      && performance.getEntriesByType('resource').some(r => r.name.includes('/admin/') && r.responseEnd > 0)) {
    window.__ready = performance.now();
  } else {
    setTimeout(check, 2);
  }
})();
"""


def page_loads(url: str) -> dict[str, tuple[float, float]]:
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for page_name in PAGES:
            context = browser.new_context(bypass_csp=True)  # wait_for_function evaluates strings
            session = f"{{token: '{TOKEN}', role: 'admin'}}"
            context.add_init_script(f"sessionStorage.setItem('policy-relay-dashboard', JSON.stringify({session}))")
            context.add_init_script(READY_PROBE)
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
            t0 = time.perf_counter()
            page.goto(f"{url}/dashboard/#/{page_name}")
            page.wait_for_function("window.__ready !== null")
            wall = (time.perf_counter() - t0) * 1000
            # from the navigation's start (the browser's own clock), as a user's first load is measured
            out[page_name] = (page.evaluate("window.__ready"), wall)
            if errors:
                raise RuntimeError(f"console errors on {page_name}: {errors}")
            context.close()
        browser.close()
    return out


def screenshots(url: str, folder: Path) -> None:
    """The overview (last day, per model) and the policy playground's diff, as the README shows them."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
        page.goto(f"{url}/dashboard/")
        page.get_by_label("Admin token or API key").fill(TOKEN)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_label("Range").select_option(label="Last day")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(folder / "overview.png"))
        page.goto(f"{url}/dashboard/#/policies")
        playground = page.get_by_role("form", name="Playground")
        playground.get_by_role("button", name="Explain").click()
        page.get_by_role("table", name="Request before and after the policy").wait_for()
        playground.locator("xpath=..").screenshot(path=str(folder / "playground.png"))  # form and its answer
        browser.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=500)
    ap.add_argument("--database-url")
    ap.add_argument("--screenshots", type=Path, help="also save the README's screenshots into this folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dash-bench-"))
    database_url = args.database_url or f"sqlite:///{tmp / 'relay.db'}"
    port = free_port()
    env = {**os.environ, "RELAY_DATABASE_URL": database_url, "RELAY_ADMIN_TOKEN": TOKEN, "RELAY_PORT": str(port),
           "RELAY_REDIS_URL": os.environ.get("RELAY_REDIS_URL", "none"), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    log = open(tmp / "relay.log", "wb")  # noqa: SIM115 (closed in finally, after the relay stops)
    proc = subprocess.Popen([sys.executable, "-m", "admin.cli", "serve", "--log-level", "warning"], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + "/health", proc)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        tenants = [client.post("/admin/tenants", json={"name": f"tenant-{i}", "token_quota": 10_000_000}).json()["id"]
                   for i in range(20)]
        channels = [client.post("/admin/channels", json={"name": f"channel-{i}", "type": "openai",
                                                          "base_url": f"http://127.0.0.1:9/{i}", "models": ["m"]}
                                ).json()["id"] for i in range(5)]
        client.post("/admin/policies", json={"model_pattern": "qwen1.5-*", "preset": "qwen1.5"}).raise_for_status()
        client.post("/admin/policies", json={"model_pattern": "qwen2.5-*", "preset": "qwen2.5"}).raise_for_status()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            keys = list(pool.map(lambda i: client.post("/admin/keys", json={"tenant_id": tenants[i % 20],
                                                                             "name": f"key-{i}"}).json()["id"],
                                 range(args.keys)))
        print(f"{args.keys} keys through the admin API in {time.perf_counter() - t0:.1f} s")
        print(f"{args.rows:,} log rows written in {seed_logs(database_url, args.rows, tenants, keys, channels):.1f} s")

        print("\nendpoint (best of 3)                            ms")
        for path in ("/admin/stats?bucket=1m&group_by=model", "/admin/stats?bucket=1h&group_by=channel",
                     "/admin/stats?bucket=1h&group_by=tenant", "/admin/logs?limit=50",
                     "/admin/logs?limit=50&status=5xx&model=qwen1.5-7b", "/admin/logs/summary",
                     "/admin/tenants", "/admin/keys?tenant_id=1", "/admin/audit?limit=50"):
            print(f"{path:<48}{timed_get(client, path):8.1f}")

        loads = page_loads(url)
        print("\npage (first load, signed in)    ms from navigation start   ms with the driver's round trips")
        for name, (ms, wall) in loads.items():
            print(f"{name:<32}{ms:6.0f}{wall:30.0f}")
        if args.screenshots:
            screenshots(url, args.screenshots)
        js = sum(f.stat().st_size for f in DASHBOARD.rglob("*.js"))
        slowest = max(ms for ms, _ in loads.values())
        print(f"\nevery page under 1 s: {'met' if slowest < 1000 else 'NOT met'} (slowest {slowest:.0f} ms)")
        print(f"total JS under 300 KB: {'met' if js < 300 * 1024 else 'NOT met'} ({js / 1024:.1f} KB)")
        return 0
    finally:
        stop(proc)
        log.close()


if __name__ == "__main__":
    raise SystemExit(main())
