"""The gateway's Prometheus metrics (prometheus-client), and GET /metrics.

Counters and histograms are observed where the pipeline already knows the facts (a request's log row, an
upstream call, a stream's first batch, a failover); gauges of shared state (Redis and the database reachable,
each channel's circuit) are read when scraped. Under `serve --workers N` every process writes its values to
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, set up by the command line) and whichever
process answers a scrape sums them all.

Labels stay bounded whatever tenants send: a model is named only when the catalog serves it ("other"
otherwise), a channel by its operator-given name, a rewritten parameter only from the request fields
policies know ("other" otherwise); never a key, a tenant or a raw client string."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Receive, Scope, Send

from backends.wire.errors import require_bearer
from relay.health import once_a_second
from relay.metrics_dir import MULTIPROC_ENV, dead_processes

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
KNOWN_PARAMS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "seed", "n", "stop", "logprobs", "top_logprobs", "logit_bias",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "stream_options", "user", "reasoning_effort",
    "dimensions", "encoding_format", "echo", "best_of", "suffix"})
REFUSALS = {"rate_limit_exceeded": "rate_limit", "insufficient_quota": "quota"}

REQUESTS = Counter("relay_requests", "Requests answered, by endpoint, model, channel, status class and cache result",
                   ["endpoint", "model", "channel", "status_class", "cache"])
DURATION = Histogram("relay_request_duration_seconds", "Time from receiving a request to its last byte",
                     ["endpoint", "model"], buckets=SECONDS)
UPSTREAM = Histogram("relay_upstream_duration_seconds",
                     "One upstream call: until its answer, or for a stream until its first chunk", ["channel"],
                     buckets=SECONDS)
FIRST_BYTE = Histogram("relay_time_to_first_byte_seconds", "Streams: time from the request to its first chunk",
                       ["endpoint", "model"], buckets=SECONDS)
PROMPT_TOKENS = Counter("relay_prompt_tokens", "Prompt tokens billed", ["model", "channel"])
COMPLETION_TOKENS = Counter("relay_completion_tokens", "Completion tokens billed", ["model", "channel"])
REWRITES = Counter("relay_policy_rewrites", "Request parameters a policy rewrote or dropped, by rule",
                   ["model", "param", "rule"])
CACHE = Counter("relay_cache_requests", "Answered requests by response-cache result", ["result"])
REFUSED = Counter("relay_refusals", "Requests refused by rate limits or token quotas", ["reason"])
FAILOVERS = Counter("relay_failovers", "Upstream failures after which the relay tried again or moved on",
                    ["channel"])
SHED = Counter("relay_shed_requests", "API requests refused or dropped before the pipeline because the process could "
               "not start them in time (loop_busy: refused on arrival while the event loop lagged and starts were "
               "paced; inflight_limit: refused on arrival at RELAY_MAX_INFLIGHT; queue_timeout: waited "
               "RELAY_QUEUE_TIMEOUT_MS; client_gone: left while waiting)", ["reason"])
SLOW_BODIES = Counter("relay_slow_bodies", "API requests answered 408 because their body did not arrive in time")
QUEUE_WAIT = Histogram("relay_queue_wait_seconds", "How long admitted API requests waited to start (those that did "
                       "not wait are not counted)", buckets=SECONDS)
WAITING = Gauge("relay_requests_waiting", "API requests waiting to start", multiprocess_mode="livesum")
INFLIGHT_LIMIT = Gauge("relay_inflight_limit", "API requests a gateway process serves at once (RELAY_MAX_INFLIGHT), "
                       "summed over processes; NaN: no limit (auto, the default)", multiprocess_mode="livesum")
START_RATE_LIMIT = Gauge("relay_start_rate_limit", "Requests per second a gateway process starts while its event loop "
                         "lags (the pace); NaN while it does not pace: every request starts on arrival",
                         multiprocess_mode="liveall")
LOOP_LAG = Histogram("relay_event_loop_lag_seconds", "How late the event loop ran a callback due every 5 ms: what "
                     "every request's next step waits beyond its own work", buckets=(
                         0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
LOOP_BUSY = Gauge("relay_event_loop_busy_ratio", "Share of the last second the event loop's thread spent on the CPU",
                  multiprocess_mode="liveall")
IN_FLIGHT = Gauge("relay_requests_in_flight", "API requests being served", multiprocess_mode="livesum")


def process_exited() -> None:
    """A gateway process stopping: its in-flight gauge no longer counts."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(os.getpid())


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


class RelayMetrics:
    """Observations with the catalog's bounded names. `known_model` and `channel_name` read the live catalog."""

    def __init__(self, known_model: Callable[[str], bool], channel_name: Callable[[int | None], str]) -> None:
        self.known_model = known_model
        self.channel_name = channel_name

    def model(self, model: Any) -> str:
        return model if isinstance(model, str) and self.known_model(model) else "other"

    def finished(self, entry: Any, status: int, usage: dict[str, Any], error_type: str | None,
                 latency_s: float) -> None:
        model, channel = self.model(entry.model), self.channel_name(entry.channel_id)
        REQUESTS.labels(entry.endpoint, model, channel, _status_class(status), entry.cache).inc()
        DURATION.labels(entry.endpoint, model).observe(latency_s)
        if status == 200:
            CACHE.labels(entry.cache).inc()
        if reason := REFUSALS.get(error_type or ""):
            REFUSED.labels(reason).inc()
        if prompt := int(usage.get("prompt_tokens") or 0):
            PROMPT_TOKENS.labels(model, channel).inc(prompt)
        if completion := int(usage.get("completion_tokens") or 0):
            COMPLETION_TOKENS.labels(model, channel).inc(completion)
        for rewrite in entry.rewrites or ():
            param, rule = rewrite.get("param"), rewrite.get("rule")
            known = param in KNOWN_PARAMS and isinstance(rule, str) and len(rule) <= 40
            # rules are named by code ("temperature.min", "greedy_as.top_k_one", "passthrough"), params bounded
            REWRITES.labels(model, param if known else "other", rule if known else "other").inc()

    def upstream(self, channel_id: int, seconds: float) -> None:
        UPSTREAM.labels(self.channel_name(channel_id)).observe(seconds)

    def first_byte(self, endpoint: str, model: str, seconds: float) -> None:
        FIRST_BYTE.labels(endpoint, self.model(model)).observe(seconds)

    def failover(self, channel_id: int) -> None:
        FAILOVERS.labels(self.channel_name(channel_id)).inc()


class InFlight:
    """ASGI middleware: counts the API requests being served (not health checks, metrics or admin calls)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            IN_FLIGHT.dec()


# Read at scrape time: (redis_up or None when Redis is deliberately off, database_up, {channel name: open} or
# None when Redis cannot say)
SharedState = tuple[bool | None, bool, dict[str, bool] | None]
StateProbe = Callable[[], Awaitable[SharedState]]


class _SharedState:
    """Gauges of state every process shares, read once per scrape by the process answering it."""

    def __init__(self, state: SharedState) -> None:
        self.state = state

    def collect(self) -> list[GaugeMetricFamily]:
        redis_up, database_up, circuits = self.state  # circuits None: Redis cannot say, so no series
        out = []
        if redis_up is not None:
            out.append(GaugeMetricFamily("relay_redis_up", "1 when Redis answers a PING", value=float(redis_up)))
        out.append(GaugeMetricFamily("relay_database_up", "1 when the database answers a query",
                                     value=float(database_up)))
        circuit = GaugeMetricFamily("relay_channel_circuit_open",
                                    "1 while a channel's circuit is open (it is cooling down, out of routing)",
                                    labels=["channel"])
        for name, is_open in sorted((circuits or {}).items()):
            circuit.add_metric([name], float(is_open))
        if circuits is not None:
            out.append(circuit)
        return out


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    token = os.environ.get("RELAY_METRICS_TOKEN", "").strip()
    if token:
        require_bearer(request.headers.get("authorization"), token,
                       "GET /metrics needs `Authorization: Bearer <RELAY_METRICS_TOKEN>`.")
    probe: StateProbe | None = getattr(request.app.state, "metrics_probe", None)
    shared = CollectorRegistry(auto_describe=False)
    if probe is not None:
        shared.register(_SharedState(await once_a_second(request.app.state, "metrics_probed", probe)))
    if folder := os.environ.get(MULTIPROC_ENV):
        for pid in dead_processes(folder):  # a killed worker's in-flight requests are not in flight any more
            multiprocess.mark_process_dead(pid, folder)
        counted = CollectorRegistry()
        multiprocess.MultiProcessCollector(counted)
    else:
        counted = REGISTRY
    return Response(generate_latest(counted) + generate_latest(shared), media_type=CONTENT_TYPE_LATEST)
