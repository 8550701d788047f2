"""uvicorn's httptools protocol, answering a request refused on arrival (relay.overload) without starting the app.

At thousands of refusals a second a refusal's cost is what the admitted requests lose. Through the app one costs a
task, ASGI's messages and two writes; here, once uvicorn has parsed the head, the gate is asked directly and the
503 goes out in one write (uvicorn's default headers, the access log line and keep-alive as for any answer). The
body, unread, is skipped by the parser. Everything else — a request that is not refused, one whose key has an IP
allow-list (only the app sees the address a trusted proxy gives), every request when no gateway app is found behind
uvicorn's own wrappers — starts the app as uvicorn would. `serve` passes it as
`http="relay.http_protocol:RefusingHttpToolsProtocol"`; written against uvicorn 0.54's protocol (pinned)."""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from relay.overload import Overload, refusal

_STATUS = b"HTTP/1.1 503 Service Unavailable\r\n"


def _front_of(app: Any) -> Overload | None:
    """The gateway's Overload layer, found through uvicorn's wrappers (proxy headers, message logging)."""
    for _ in range(8):
        front = getattr(app, "_front", None)
        if isinstance(front, Overload):
            return front
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class RefusingHttpToolsProtocol(HttpToolsProtocol):
    _front: Overload | None = None  # this connection's, once found

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        front = self._front = self._front or _front_of(self.app)
        refused = front.refusal_now(cycle.scope) if front is not None else None
        if refused is None:
            super()._start_asgi_task(cycle, app)
            return
        body, headers = refusal(refused, cycle.scope)
        head = [_STATUS]
        for name, value in (*cycle.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", body)
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        if cycle.access_log:
            cycle.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope), cycle.scope["method"],
                                     get_path_with_query_string(cycle.scope), cycle.scope["http_version"], 503)
        self.transport.write(b"".join(head))
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()
