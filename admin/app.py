"""The application `policy-relay serve` runs: the gateway's core (relay.app) plus the admin side — the admin
API routers, the guard that refuses strangers at /admin before any body is read, and the service write the
pipeline calls to auto-disable a channel whose credentials keep being refused."""

from __future__ import annotations

from fastapi import FastAPI

from admin import cache, channels, keys, policies, service, tenants, usage
from admin.deps import AdminGuard
from relay.app import create_app as create_gateway
from relay.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = create_gateway(settings, auto_disable=service.auto_disable)
    # Added after the gateway's body limit, so it runs before it.
    app.add_middleware(AdminGuard, admin_token=settings.admin_token)
    for module in (tenants, keys, channels, policies, cache, usage):
        app.include_router(module.router)
    return app
