"""Liveness and readiness, and the reachability probes /metrics shares.

/health/live: the process serves HTTP (a load balancer or kubelet restarts it otherwise).
/health/ready: it should get traffic — its catalog is loaded, the database answers and holds the schema this
code expects, Redis answers (or is deliberately off), and the local worker answers when `serve` runs one.
/health (relay.api) stays as it was: 200 once started."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Engine, text

from relay.redis_state import RedisState

PROBE_TIMEOUT_S = 2.0
PROBE_EVERY_S = 1.0  # readiness checks and /metrics' shared gauges: at most one round of probes a second
WORKER_ENV = "RELAY_READY_WORKER_URL"  # set by `serve --with-worker`: the worker readiness waits for

router = APIRouter()


def expected_revision(database_url: str) -> tuple[str | None, frozenset[str]]:
    """The newest migration this code ships, and every one it knows (read once at start)."""
    from alembic.script import ScriptDirectory

    from relay.db import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config(database_url))
    return scripts.get_current_head(), frozenset(s.revision for s in scripts.walk_revisions())


async def database_revision(engine: Engine) -> str | None:
    """The schema revision the database holds; raises when the database does not answer in time."""
    def read() -> str | None:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    return await asyncio.wait_for(asyncio.to_thread(read), PROBE_TIMEOUT_S)


async def database_up(engine: Engine) -> bool:
    try:
        await database_revision(engine)
    except Exception:
        return False
    return True


async def redis_up(state: RedisState) -> bool | None:
    """None when Redis is deliberately off (RELAY_REDIS_URL=off)."""
    if state.client is None:
        return None
    try:
        return bool(await asyncio.wait_for(state.client.ping(), PROBE_TIMEOUT_S))
    except Exception:
        return False


async def once_a_second(holder: Any, name: str, probe: Callable[[], Awaitable[Any]]) -> Any:
    """probe()'s answer, shared by every caller within PROBE_EVERY_S: concurrent callers await the same run, so
    any rate of scrapes or health checks costs one probe a second."""
    cached = getattr(holder, name, None)
    now = time.monotonic()
    if cached is None or now - cached[0] >= PROBE_EVERY_S:
        cached = (now, asyncio.ensure_future(probe()))
        setattr(holder, name, cached)
    return await asyncio.shield(cached[1])


async def _worker_up(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            return (await client.get(url.rstrip("/") + "/health")).status_code == 200
    except httpx.HTTPError:
        return False


async def readiness(app_state: Any) -> dict[str, str]:
    """Each check's verdict: "ok", "off", or what is wrong."""
    if not getattr(app_state, "ready", False):
        return {"catalog": "not loaded yet"}
    checks: dict[str, str] = {"catalog": "ok"}
    try:
        revision = await database_revision(app_state.engine)
        want, known = app_state.schema_revision, app_state.schema_revisions
        checks["database"] = "ok"
        if revision == want or (revision is not None and revision not in known):
            # A revision this code does not know is a newer one: a rolling update's first new process migrated
            # it, and the old processes keep serving until they are replaced.
            checks["migrations"] = "ok"
        else:
            checks["migrations"] = f"at {revision}, this code needs {want}: run `policy-relay db upgrade`"
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
    up = await redis_up(app_state.redis_state)
    checks["redis"] = "off" if up is None else "ok" if up else "unreachable"
    if worker := os.environ.get(WORKER_ENV):
        checks["worker"] = "ok" if await _worker_up(worker) else "not answering"
    return checks


@router.get("/health/live", include_in_schema=False)
async def live() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/health/ready", include_in_schema=False)
async def ready(request: Request) -> Response:
    state = request.app.state
    # Unauthenticated: any rate of probes costs one database query, one PING (and one worker call) a second.
    checks = await once_a_second(state, "readiness_checked", lambda: readiness(state))
    ok = all(verdict in ("ok", "off") for verdict in checks.values())
    return Response(orjson.dumps({"status": "ready" if ok else "not_ready", "checks": checks}),
                    status_code=200 if ok else 503, media_type="application/json")
