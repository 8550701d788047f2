"""/dashboard: the browser console, static files from admin/dashboard/ served by the same app (no build step,
no CDN: the vendored libraries are files here). It talks only to the admin API and /tenant/*."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

DASHBOARD_DIR = Path(__file__).with_name("dashboard")
# Same origin only: no third-party script, style or connection can run in a page that holds the admin token.
_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),
]


# What the pages need; the folder's README, vendor script and screenshots are for developers, not served.
_SERVED = (".html", ".js", ".css")


class _DashboardFiles(StaticFiles):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if not (path.endswith("/") or path.endswith(_SERVED)):
            await PlainTextResponse("Not Found", status_code=404)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + _HEADERS
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def mount_dashboard(app: FastAPI) -> None:
    @app.get("/dashboard", include_in_schema=False)
    def dashboard_root() -> RedirectResponse:  # relative URLs in index.html need the trailing slash
        return RedirectResponse("/dashboard/")

    app.mount("/dashboard/", _DashboardFiles(directory=DASHBOARD_DIR, html=True), name="dashboard")
