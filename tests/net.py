"""Process and port helpers shared by the tests and the benchmarks (bench/ imports them from a checkout)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], object], timeout: float = 20, what: str = "condition") -> None:
    """Polls `check` (exceptions count as not yet) until it is truthy."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 90,
                 log: Callable[[], str] = lambda: "") -> None:
    """Until GET url answers 200; fails at once if `process` exits first (with its log)."""
    deadline = time.time() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited early (code {process.returncode}):\n{log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.time() > deadline:
            raise RuntimeError(f"{url} did not become healthy within {timeout:.0f} s:\n{log()}")
        time.sleep(0.1)


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
