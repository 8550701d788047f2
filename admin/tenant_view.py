"""/tenant/*: what a tenant sees of itself with one of its API keys (read-only, as ONE API's users see their
own page): limits, quota left, the last day's usage and its own recent requests — never another tenant's."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import timedelta

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import func, select
from sqlmodel import Session

from admin.deps import JSONLimitedRoute, db_session
from admin.logs import Cursor, LogFilter, log_page
from relay.auth import Principal, authenticate
from relay.errors import APIError
from relay.models import ApiKey, Tenant, request_stats, utcnow

router = APIRouter(prefix="/tenant", tags=["tenant"], route_class=JSONLimitedRoute)

READS_PER_MINUTE = 60  # per key and process: these reads hit the database, unlike the relay's hot path


class _Throttle:
    """A small per-key token bucket, so one key cannot turn the log into a database load test."""

    def __init__(self, per_minute: int, remembered: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(per_minute)
        self.remembered = remembered
        self._buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key_id: int) -> None:
        with self._lock:  # the routes are sync: FastAPI runs them on a thread pool
            self._take(key_id)

    def _take(self, key_id: int) -> None:
        now = time.monotonic()
        tokens, at = self._buckets.pop(key_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self._buckets[key_id] = (tokens, now)
            wait = int((1 - tokens) / self.rate) + 1
            raise APIError(429, f"Too many reads of this page; retry in {wait} s.", "requests", None,
                           "rate_limit_exceeded", headers={"Retry-After": str(wait)})
        self._buckets[key_id] = (tokens - 1, now)
        while len(self._buckets) > self.remembered:
            self._buckets.popitem(last=False)


_throttle = _Throttle(READS_PER_MINUTE)


def tenant_principal(request: Request) -> Principal:
    client_ip = request.client.host if request.client else None
    principal = authenticate(request.app.state.catalog.snapshot, request.headers.get("authorization"), client_ip)
    _throttle.take(principal.key.id)
    return principal


def _left(quota: int | None, used: int) -> int | None:
    return None if quota is None else max(0, quota - used)


@router.get("/self")
def tenant_self(request: Request, who: Principal = Depends(tenant_principal),
                s: Session = Depends(db_session)) -> dict:
    usage = request.app.state.usage
    tenant, key = who.tenant, who.key
    key_row, tenant_row = s.get(ApiKey, key.id), s.get(Tenant, tenant.id)
    # The recorder holds totals only where a quota needs them; the rows have them all (up to the last flush).
    tenant_used = max(usage.tenant_used(tenant.id), tenant_row.used_tokens if tenant_row else 0)
    key_used = max(usage.key_used(key.id), key_row.used_tokens if key_row else 0)
    day = _last_day(s, tenant.id)
    return {
        "tenant": {"id": tenant.id, "name": tenant.name, "status": "active" if tenant.active else "disabled",
                   "rpm": tenant.rpm, "tpm": tenant.tpm, "token_quota": tenant.token_quota,
                   "used_tokens": tenant_used, "quota_left": _left(tenant.token_quota, tenant_used)},
        "key": {"id": key.id, "name": key.name, "prefix": key_row.prefix if key_row else None,
                "models": sorted(key.models) if key.models is not None else None,
                "rpm": key.rpm, "tpm": key.tpm, "token_quota": key.token_quota, "used_tokens": key_used,
                "quota_left": _left(key.token_quota, key_used),
                "expires_at": key.expires_at.isoformat() if key.expires_at else None},
        "usage_24h": day,
    }


def _last_day(s: Session, tenant_id: int) -> dict[str, int]:
    """The last 24 hours (by the hour, the current one included) from the rollup: a few rows, however busy."""
    t = request_stats.c
    since = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    names = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens")
    sums = s.execute(select(*(func.sum(t[n]) for n in names))
                     .where(t.width == 3600, t.start >= since, t.tenant_id == tenant_id)).one()
    return {name: int(value or 0) for name, value in zip(names, sums, strict=True)}


@router.get("/logs")
def tenant_logs(limit: int = Query(50, ge=1, le=100), cursor: Cursor = None,
                who: Principal = Depends(tenant_principal), s: Session = Depends(db_session)) -> dict:
    """The tenant's own requests, newest first (its keys' and nothing else); channel ids stay the operator's."""
    page = log_page(s, LogFilter(tenant_id=who.tenant.id), limit, cursor)
    for row in page["data"]:
        row.pop("channel_id", None)
        row.pop("upstream_model", None)
    return page
