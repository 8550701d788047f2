"""The gateway's core application: wires settings, database, secrets, in-memory catalog, Redis state,
accounting and pipeline behind the OpenAI endpoints, and runs the background loops (config poll and nudges,
log flush, cache statistics). The admin side (its API, its guard, the service writes the pipeline may ask for)
is added from outside by admin.app, so the core never imports it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from fastapi import FastAPI
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlmodel import Session
from starlette.types import Receive, Scope, Send

from backends.wire.body_limit import BodyLimit
from channels.base import Channel
from channels.litellm_base import warm_up
from channels.openai_http import close_sessions
from channels.registry import channel_types
from relay import __version__, config_state
from relay.accounting import Accounting
from relay.admission import Gate
from relay.api import router as openai_router
from relay.cache import ResponseCache
from relay.catalog import Catalog
from relay.circuit import CircuitBreaker
from relay.config_sync import ConfigSync
from relay.db import make_engine
from relay.dispatch import Dispatcher
from relay.errors import install_handlers
from relay.health import database_up, expected_revision, redis_up
from relay.health import router as health_router
from relay.lifecycle import Drain
from relay.limits import RateLimiter
from relay.loop_guard import LoopGuard
from relay.metrics import INFLIGHT_LIMIT, InFlight, RelayMetrics, SharedState, process_exited
from relay.metrics import router as metrics_router
from relay.overload import Overload
from relay.pipeline import Pipeline
from relay.quota import QuotaLedger
from relay.redis_state import RedisState
from relay.request_context import RequestId
from relay.secrets import resolve_box
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


# Writes a channel's auto-disabling (with its audit event) in the caller's session; True when it was enabled.
AutoDisable = Callable[[Session, int, str], bool]
# A background job added from outside (e.g. admin.adaptive), run every so many seconds with the started app.
Chore = tuple[float, Callable[[FastAPI], Awaitable[None]]]


def create_app(settings: Settings | None = None, *, auto_disable: AutoDisable | None = None,
               chores: Sequence[Chore] = ()) -> FastAPI:
    """Without `auto_disable`, a channel whose credentials keep being refused is only cooled down."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _tune_interpreter()
        channel_types()  # two plugins claiming one channel type name stop the start, with both named
        engine = make_engine(settings.database_url)
        box = resolve_box(settings.database_url, settings.secret_key, settings.secret_key_file)
        try:
            await asyncio.to_thread(config_state.check_secret_key, engine, box)
            state = await asyncio.to_thread(config_state.read, engine)
        except (OperationalError, ProgrammingError) as exc:
            raise RuntimeError("The database has no policy-relay schema: run `policy-relay db upgrade` "
                               f"(RELAY_DATABASE_URL={settings.database_url}).") from exc
        catalog = Catalog(engine, box)
        usage = UsageRecorder(engine)
        await asyncio.to_thread(catalog.reload)
        await usage.flush()  # loads the current token totals
        await warm_up()
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
            # litellm prints through handlers of its own as well: one line per record, in the relay's log format
            logging.getLogger(name).handlers.clear()
        redis_state = RedisState(settings.redis_url, state.deployment_id)
        cache = ResponseCache(redis_state)
        config_sync = ConfigSync(catalog, redis_state, settings.config_poll_s)
        limits = RateLimiter(redis_state, settings.rate_burst_s)
        metrics = RelayMetrics(lambda model: model in catalog.snapshot.channels_by_model,
                               lambda cid: _channel_name(catalog, cid))
        accounting = Accounting(usage, limits, QuotaLedger(redis_state, usage), cache.stats, settings.output_estimate,
                                metrics)

        async def disable_channel(channel: Channel, reason: str) -> None:
            def write() -> bool:
                with Session(engine) as s:
                    return auto_disable(s, channel.config.id, reason) if auto_disable else False

            if await asyncio.to_thread(write):
                log.error("channel %s auto-disabled: %s", channel.config.name, reason)
                await asyncio.to_thread(config_sync.changed)

        drain = Drain(settings.drain_timeout_s)
        drain.install()
        app.state.engine, app.state.catalog, app.state.usage, app.state.cache = engine, catalog, usage, cache
        app.state.config_sync, app.state.redis_state = config_sync, redis_state
        app.state.schema_revision, app.state.schema_revisions = await asyncio.to_thread(expected_revision,
                                                                                        settings.database_url)
        breaker = CircuitBreaker(redis_state, settings.circuit_failures, settings.circuit_cooldown_s)

        async def probe() -> SharedState:
            channels = catalog.snapshot.channels
            cooling = await breaker.cooling(list(channels)) if redis_state.client is not None else None
            state = await asyncio.gather(redis_up(redis_state), database_up(engine))
            circuits = None if cooling is None else {c.config.name: cid in cooling for cid, c in channels.items()}
            return state[0], state[1], circuits

        app.state.metrics_probe = probe
        dispatch = Dispatcher(breaker, metrics, disable_channel, settings.processes)
        app.state.pipeline = Pipeline(catalog, accounting, cache, dispatch, drain)
        tasks = [asyncio.create_task(config_sync.poll_forever()),
                 asyncio.create_task(config_sync.listen_forever()),
                 asyncio.create_task(usage.flush_forever(settings.log_flush_s)),
                 asyncio.create_task(_every(settings.log_flush_s, cache.flush_stats))]
        tasks += [asyncio.create_task(_every(every_s, _bound(job, app))) for every_s, job in chores]
        INFLIGHT_LIMIT.set(math.nan if settings.max_inflight is None else settings.max_inflight)
        guard = LoopGuard(gate, settings.loop_lag_s)
        guard.start()
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            guard.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await usage.flush()
            await cache.flush_stats()
            await redis_state.close()
            await close_sessions()
            config_sync.close()
            engine.dispose()
            process_exited()

    app = _Gateway(title="policy-relay", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.ready = False
    app.state.gate = gate = Gate(settings.max_inflight, settings.queue_timeout_s)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, setting="RELAY_MAX_BODY_MB")
    app.add_middleware(InFlight)
    app.add_middleware(RequestId)  # outermost of the middleware added here: even a refused body's answer has its id
    install_handlers(app, settings.max_body_bytes)
    app.include_router(openai_router)
    app.include_router(health_router)
    app.include_router(metrics_router)
    return app


class _Gateway(FastAPI):
    """FastAPI with relay.overload in front of all of it, its telemetry check and error handler included: a request
    refused for want of capacity passes through nothing else."""

    _front: Overload | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if self._front is None:
            settings = self.state.settings
            self._front = Overload(super().__call__, self.state, settings.max_body_bytes, settings.body_timeout_s)
        await self._front(scope, receive, send)


def _tune_interpreter() -> None:
    """Pauses that every request in flight would wait out, measured with bench/overload_bench.py at 8× capacity:
    - the request-log flush runs Python in a thread; with the default 5 ms switch interval the event loop waits up
      to that long for the GIL at every step meanwhile, and requests arriving during a flush were answered 50-100 ms
      late (refusals included). 1 ms keeps those waits short.
    - at ~2,000 requests/s the collector's full passes came every second or two and took 50-95 ms; collecting the
      youngest generation every 10,000 allocations instead of 700 lets short-lived cycles die young, and the
      middle one every 5 of those keeps its passes at 15-40 ms (every 20: 80-200 ms), with no full pass in the run.
      Stalls over 20 ms per 5 s at 8× capacity: 14 and 4 with the defaults, 5 and 5 with these, max 415 → 57 ms."""
    sys.setswitchinterval(0.001)
    gc.set_threshold(10_000, 5, 10)


def _bound(job: Callable[[FastAPI], Awaitable[None]], app: FastAPI) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        await job(app)

    run.__name__ = getattr(job, "__qualname__", "chore")  # what a failure's log line names
    return run


def _channel_name(catalog: Catalog, channel_id: int | None) -> str:
    channel = catalog.snapshot.channels.get(channel_id) if channel_id is not None else None
    return channel.config.name if channel is not None else "none"
