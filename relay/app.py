"""The application factory: wires settings, database, in-memory catalog, usage recorder, pipeline
and routers, and runs the background loops (config poll, log flush)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from sqlalchemy.exc import OperationalError, ProgrammingError

from admin import cache as admin_cache
from admin import channels as admin_channels
from admin import keys as admin_keys
from admin import policies as admin_policies
from admin import tenants as admin_tenants
from admin import usage as admin_usage
from channels.litellm_base import warm_up
from relay import __version__
from relay.api import router as openai_router
from relay.cache import ResponseCache
from relay.catalog import Catalog
from relay.circuit import CircuitBreaker
from relay.db import make_engine
from relay.errors import install_handlers
from relay.limits import RateLimiter
from relay.pipeline import Pipeline
from relay.redis_state import RedisState
from relay.settings import Settings
from relay.usage import UsageRecorder

log = logging.getLogger("relay")


async def _every(interval_s: float, job) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception as exc:  # a background chore must never stop repeating
            log.warning("%s failed: %s", getattr(job, "__name__", job), exc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url)
        catalog = Catalog(engine)
        usage = UsageRecorder(engine)
        try:
            await asyncio.to_thread(catalog.reload)
        except (OperationalError, ProgrammingError) as exc:
            raise RuntimeError("The database has no policy-relay schema: run `policy-relay db upgrade` "
                               f"(RELAY_DATABASE_URL={settings.database_url}).") from exc
        await usage.flush()  # loads the current token totals
        await warm_up()
        redis_state = RedisState(settings.redis_url)
        cache = ResponseCache(redis_state)
        app.state.engine, app.state.catalog, app.state.usage, app.state.cache = engine, catalog, usage, cache
        breaker = CircuitBreaker(redis_state, settings.circuit_failures, settings.circuit_cooldown_s)
        app.state.pipeline = Pipeline(catalog, usage, cache, RateLimiter(redis_state, settings.rate_burst_s), breaker)
        tasks = [asyncio.create_task(catalog.poll_forever(settings.config_poll_s)),
                 asyncio.create_task(usage.flush_forever(settings.log_flush_s)),
                 asyncio.create_task(_every(settings.log_flush_s, cache.flush_stats))]
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await usage.flush()
            await cache.flush_stats()
            await redis_state.close()
            engine.dispose()

    app = FastAPI(title="policy-relay", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.ready = False
    install_handlers(app)
    app.include_router(openai_router)
    for module in (admin_tenants, admin_keys, admin_channels, admin_policies, admin_cache, admin_usage):
        app.include_router(module.router)
    return app
