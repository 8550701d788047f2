"""A lean HTTP/1.1 load generator for the overload benchmark: keep-alive connections on asyncio protocols (uvloop
when installed), one prepared request's bytes written per call, only the status line and the body's framing read
back (Content-Length, or chunked transfer encoding: a stream's server-sent events are counted, not parsed). An
aiohttp client costs several times more CPU per request; at thousands of requests a second on a two-core machine
it would measure itself instead of the relay. Below the client: closed and open loops, and a tally of what came
back (answered, refused with Retry-After, anything else)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import checkpoint, pct

Answer = tuple[int, bytes]  # status, the response head (lower-cased)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: bytes | None = None
        self.remaining = 0
        self.chunked = False
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.buffer[:end]).lower()
            del self.buffer[:end + 4]
            self.chunked = b"\r\ntransfer-encoding: chunked" in self.head
            at = self.head.find(b"\r\ncontent-length:")
            stop = self.head.find(b"\r\n", at + 2) if at >= 0 else -1
            self.remaining = 0 if at < 0 else int(self.head[at + 17:stop if stop > 0 else len(self.head)])
        if self.chunked and not self._chunks_done() or len(self.buffer) < self.remaining:
            return
        head, self.head = self.head, None
        del self.buffer[:self.remaining]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((int(head[9:12]), head))
        if not self.closed:
            self.pool.idle.append(self)

    def _chunks_done(self) -> bool:
        """Skips the complete chunks in the buffer; True once the last (empty) one has arrived."""
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(self.buffer[:line_end]).split(b";")[0], 16)
            if len(self.buffer) < line_end + 2 + size + 2:
                return False
            del self.buffer[:line_end + 2 + size + 2]  # the size line, the data and its CRLF (or the last CRLF)
            if size == 0:
                self.remaining = 0
                return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def send(self, raw: bytes) -> asyncio.Future[Answer]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)  # type: ignore[union-attr]
        return self.waiter


class Pool:
    """Connections to one host:port; a request takes an idle one or opens another."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []
        self.all: list[_Connection] = []

    async def request(self, raw: bytes, timeout_s: float = 60.0) -> tuple[Answer | None, float]:
        """(status, head) or None for a transport failure, and the seconds it took (connecting included)."""
        t0 = time.perf_counter()
        try:
            conn = None
            while self.idle:
                candidate = self.idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            if conn is None:
                _, conn = await asyncio.get_running_loop().create_connection(lambda: _Connection(self), self.host,
                                                                             self.port)
                self.all.append(conn)
            answer = await asyncio.wait_for(conn.send(raw), timeout_s)
        except (OSError, TimeoutError, ConnectionError):
            return None, time.perf_counter() - t0
        return answer, time.perf_counter() - t0

    def close(self) -> None:
        for conn in self.all:
            if conn.transport is not None:
                conn.transport.close()
        self.all.clear()
        self.idle.clear()


def post(path: str, host: str, headers: dict[str, str], body: bytes) -> bytes:
    """A keep-alive POST's bytes."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- load shapes and their tallies ----------------------------------------------------------------------------

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


async def one(pool: Pool, raw: bytes, tally: Tally) -> float:
    """One request, tallied; for a refusal, the seconds its retry-after-ms asks to wait (else 0)."""
    answer, seconds = await pool.request(raw)
    tally.last_done = time.perf_counter()
    status, head = answer or (0, b"")
    if status == 200:
        tally.ok_ms.append(seconds * 1000)
    elif status == 503 and b"\r\nretry-after:" in head:
        tally.shed_ms.append(seconds * 1000)
        at = head.find(b"\r\nretry-after-ms:")
        if at >= 0:
            end = head.find(b"\r\n", at + 2)
            return int(head[at + 17:end if end > 0 else len(head)]) / 1000
    else:
        tally.other += 1
    return 0.0


async def closed_loop(pool: Pool, raw: bytes, clients: int, seconds: float) -> Tally:
    """`clients` clients sending back to back for `seconds`; a refused one waits its retry-after-ms first, as the
    openai SDKs do (a client retrying at once would only measure how fast it can be refused)."""
    tally, deadline = Tally(), time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < deadline:
            checkpoint()
            backoff = await one(pool, raw, tally)
            if backoff:
                await asyncio.sleep(min(backoff, max(0.0, deadline - time.perf_counter())))

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
