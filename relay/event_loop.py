"""The gateway's event loop: uvloop, whose listening sockets accept every pending connection at once.

libuv accepts one connection per loop iteration (libuv#3696, "don't accept() connections in a loop"). A gateway
whose iterations take milliseconds under load then took new connections at ~130 a second; the rest waited in the
listen backlog, overflowed it, and waited out TCP's SYN-ACK retries — 1 to 3 seconds before the request was even
read, refusals included (bench/overload_bench.py, strace: one accept4 per epoll_wait). asyncio's own loop accepts
every pending connection but costs ~18 µs more per request (a trivial uvicorn app: 24 → 42 µs). So uvicorn runs
this loop (`serve` passes it as `loop="relay.event_loop:new_event_loop"`): a plain TCP `create_server` gets
listening sockets of its own, read with `add_reader`, taking up to ACCEPT_BATCH pending connections per wake-up;
each is then handed to uvloop (`connect_accepted_socket`), which serves it as it would have. TLS servers, and
anything else this does not know, are uvloop's own."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

import uvloop

log = logging.getLogger("relay.event_loop")

# Thousands of connections a second at any iteration length seen under load, and few enough that one of the
# processes of `serve --workers N` (which share the listening socket) does not take a whole burst.
ACCEPT_BATCH = 64
ACCEPT_RETRY_S = 1.0  # after running out of file descriptors, accepting pauses this long (as asyncio's does)
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class _Listener:
    """What uvicorn uses of an asyncio.Server (`sockets`, `close`, `wait_closed`), accepting eagerly."""

    def __init__(self, loop: uvloop.Loop, sockets: list[socket.socket],
                 protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self._loop, self.sockets, self._factory = loop, sockets, protocol_factory
        self._serving = True
        self._connections: set[asyncio.Task] = set()  # hand-overs in progress
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                log.error("accepting connections paused for %g s: %s", ACCEPT_RETRY_S, exc)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_S, self._resume, sock)
                return
            conn.setblocking(False)  # uvloop sets TCP_NODELAY on it, as on the connections it accepts itself
            task = self._loop.create_task(self._hand_over(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _hand_over(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except BaseException:  # the transport never took it (the client left first, say): not left to the collector
            conn.close()
            raise

    def _resume(self, sock: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()

    async def wait_closed(self) -> None:
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)


class EagerAcceptLoop(uvloop.Loop):
    async def create_server(self, protocol_factory, host=None, port=None, *, sock=None, backlog=100, ssl=None,
                            reuse_address=None, reuse_port=None, **kwargs):  # noqa: ANN001, ANN201 (asyncio's signature)
        if ssl is not None or kwargs or (sock is None and port is None):
            return await super().create_server(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl,
                                               reuse_address=reuse_address, reuse_port=reuse_port, **kwargs)
        sockets = [sock] if sock is not None else await self._bind(host, port, bool(reuse_port))
        for listening in sockets:
            listening.setblocking(False)
            listening.listen(backlog)
        return _Listener(self, sockets, protocol_factory)

    async def _bind(self, host: str | None, port: int, reuse_port: bool) -> list[socket.socket]:
        """A listening socket per address `host` resolves to, as asyncio's create_server makes them (an address
        family this system cannot open is passed over)."""
        infos = await self.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                try:
                    listening = socket.socket(family, kind, proto)
                except OSError:  # IPv6 resolved, but disabled in this kernel
                    continue
                sockets.append(listening)
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    listening.bind(address)
                except OSError as exc:
                    raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: "
                                             f"{exc.strerror}") from None
        except OSError:
            for listening in sockets:
                listening.close()
            raise
        if not sockets:
            raise OSError(f"no address to listen on for {host!r}")
        return sockets


def new_event_loop() -> EagerAcceptLoop:
    return EagerAcceptLoop()


def raise_open_files_limit() -> int:
    """The soft limit on open files raised to the hard one (as Go's runtime and nginx's workers do): every request in
    flight holds two sockets, and a soft limit of 1,024 (many systems' default) would cap a gateway at ~500 of them,
    refusing connections with EMFILE. Returns the limit now in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d: %s", soft, exc)
    return soft
