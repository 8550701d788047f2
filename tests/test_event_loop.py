"""relay.event_loop: the gateway's uvloop accepts every pending connection (libuv takes one per loop iteration), keeps
serving after running out of file descriptors, and `serve` raises the open files limit."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, run_server

LOOP = "relay.event_loop:new_event_loop"


def busy_server(tmp_path, loop: str, *args: str) -> contextlib.AbstractContextManager[str]:
    return run_server(tmp_path, "tests.busy_server", "--loop", loop, *args, health="/")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _get(port: int, timeout: float = 30) -> bool:
    """One request on a connection of its own; True on a 200."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        return head.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


def _burst(port: int, n: int) -> tuple[int, float]:
    """n new connections at once, a request on each: (how many got a 200, seconds until the last answer)."""
    async def main() -> tuple[int, float]:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_get(port) for _ in range(n)), return_exceptions=True)
        return sum(r is True for r in results), time.perf_counter() - t0

    return asyncio.run(main())


@pytest.mark.parametrize("loop", [LOOP, "uvloop"])
def test_a_busy_loop_still_accepts_a_burst_of_new_connections_at_once(tmp_path, loop):
    """Every iteration of the server's loop lasts 20 ms: libuv's own listener (stock uvloop) takes one connection per
    iteration, so 300 new ones take ~6 s; the gateway's takes up to 64 per iteration. (The stock case is measured too:
    it shows this test tells them apart, and when a libuv release changes, that it is time to drop the workaround.)"""
    with busy_server(tmp_path, loop, "--hog-ms", "20") as url:
        answered, seconds = _burst(_port(url), 300)
    assert answered == 300
    if loop == LOOP:
        assert seconds < 2.0
    else:
        assert seconds > 3.0


def test_out_of_file_descriptors_it_pauses_accepting_and_then_serves_again(tmp_path):
    with busy_server(tmp_path, LOOP, "--nofile", "64") as url:
        port = _port(url)
        held = []
        for _ in range(80):  # more connections than descriptors: the rest wait in the backlog, unaccepted
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        for sock in held:
            sock.close()
        time.sleep(1.5)  # past the pause (ACCEPT_RETRY_S)
        answered, _ = _burst(port, 20)
    assert answered == 20
    assert "accepting connections paused" in next(tmp_path.glob("busy_server-*.log")).read_text()


def test_the_open_files_limit_is_raised_to_the_hard_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 1024:
        pytest.skip(f"the hard limit here ({hard}) leaves nothing to check")
    code = ("import resource; from relay.event_loop import raise_open_files_limit; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
            "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(hard), str(hard)]
