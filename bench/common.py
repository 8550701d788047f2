"""What the benchmark scripts share: the servers they start, readiness, percentiles, and Ctrl-C handling.
Run from a checkout: the fake upstream and the port helper come from tests/."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests.net import free_port  # noqa: E402

__all__ = ["ROOT", "STOP", "Servers", "admin_post", "checkpoint", "free_port", "install_signal_handlers", "pct", "run",
           "server_timing", "wait_ready"]

# Set by SIGINT/SIGTERM and checked before every request: raising from the signal handler itself could land
# inside a uvloop or aiohttp callback that turns it into a mere connection error.
STOP = threading.Event()


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


def server_timing(header: str) -> dict[str, float]:
    """`Server-Timing: upstream;dur=1.2, relay;dur=0.3` → {"upstream": 1.2, "relay": 0.3}."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur)
    return out


class Servers:
    """Subprocesses, each in its own session so a server's workers stop with it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        full_env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.tmp / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    async def start_fake_upstream(self, session: aiohttp.ClientSession, port: int, delay_ms: float,
                                  name: str = "upstream") -> str:
        """tests/fake_upstream.py (an OpenAI-speaking server answering at once, or after `delay_ms`) on `port`;
        its base URL once it answers."""
        proc = self.start(name, [sys.executable, "-m", "tests.fake_upstream", "--port", str(port),
                                       "--delay-ms", str(delay_ms)])
        url = f"http://127.0.0.1:{port}"
        await wait_ready(session, url + "/v1/models", proc, 30)
        return url

    def log_tail(self, name: str, lines: int = 8) -> str:
        text = (self.tmp / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return "\n".join("    " + line for line in text[-lines:])

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this process leads (start_new_session)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def admin_post(session: aiohttp.ClientSession, base: str, token: str):
    """`await post(path, payload)`: an admin API POST's JSON answer, or RuntimeError with the refusal."""
    async def post(path: str, payload: dict) -> dict:
        async with session.post(base + path, json=payload, headers={"Authorization": f"Bearer {token}"}) as r:
            if r.status >= 300:
                raise RuntimeError(f"POST {path} -> {r.status}: {await r.text()}")
            return await r.json()

    return post


def checkpoint() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt


async def wait_ready(session: aiohttp.ClientSession, url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        checkpoint()
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            async with session.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"not ready after {timeout_s:.0f}s")


def _on_signal(signum: int, _frame: object) -> None:
    if STOP.is_set():
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    STOP.set()


def run(coro: Coroutine[None, None, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def install_signal_handlers() -> None:
    """Ctrl-C (or SIGTERM) stops at the next request; the callers' finally blocks stop the servers."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
