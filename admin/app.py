"""The application `policy-relay serve` runs: the gateway's core (relay.app) plus the admin side — the admin
API routers, the dashboard, a tenant's read-only view of itself, the guard that refuses strangers at /admin
before any body is read, and the service write the pipeline calls to auto-disable a channel whose
credentials keep being refused, and the adaptive-temperature chore."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware import Middleware

from admin import (
    adaptive,
    cache,
    channels,
    insights,
    keys,
    logs,
    policies,
    service,
    stats,
    tenant_view,
    tenants,
    transfer,
    usage,
)
from admin.dashboard_files import mount_dashboard
from admin.deps import AdminGuard
from relay.app import create_app as create_gateway
from relay.request_context import RequestId
from relay.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = create_gateway(settings, auto_disable=service.auto_disable,
                         chores=[(settings.adaptive_every_s, adaptive.adapt)])
    # Before the gateway's body limit, but inside its request-id layer (which stays outermost: a refusal of the
    # guard carries its id too).
    position = next(i for i, m in enumerate(app.user_middleware) if m.cls is RequestId) + 1
    app.user_middleware.insert(position, Middleware(AdminGuard, admin_token=settings.admin_token))
    for module in (tenants, keys, channels, policies, insights, transfer, cache, usage, logs, stats, tenant_view):
        app.include_router(module.router)
    mount_dashboard(app)
    return app
