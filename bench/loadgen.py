"""A lean HTTP/1.1 load generator for the overload benchmark: keep-alive connections on asyncio protocols (uvloop
when installed), one prepared request's bytes written per call, only the status line and Content-Length read
back. An aiohttp client costs several times more CPU per request; at thousands of requests a second on a
two-core machine it would measure itself instead of the relay."""

from __future__ import annotations

import asyncio
import time

Answer = tuple[int, bytes]  # status, the response head (lower-cased)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.head: bytes | None = None
        self.remaining = 0
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
            at = self.head.find(b"\r\ncontent-length:")
            stop = self.head.find(b"\r\n", at + 2) if at >= 0 else -1
            self.remaining = 0 if at < 0 else int(self.head[at + 17:stop if stop > 0 else len(self.head)])
        if len(self.buffer) >= self.remaining:
            head, self.head = self.head, None
            del self.buffer[:self.remaining]
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result((int(head[9:12]), head))
            if not self.closed:
                self.pool.idle.append(self)

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
