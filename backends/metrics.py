"""The worker's GET /metrics in Prometheus' text format, in the spirit of vLLM's `vllm:*` metrics (named `worker_*`
here, base units in the names, counters ending in `_total`). Each app has its own CollectorRegistry: a process may
host several worker apps (the tests do), and a worker never writes into a gateway's registry.

Counters and histograms are fed as the engine runs (EngineMetrics is its observer: a few O(rows) calls per step);
gauges (batch rows, queue, KV columns, non-finite rows) are read from the engine when scraped, so the hot path never
updates them. Every series carries `model`, fixed per process, so cardinality stays bounded."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from backends.admission import TokenRate
from backends.wire.errors import require_bearer

if TYPE_CHECKING:
    from backends.engine import Engine, GenRequest, _Row

TOKEN_ENV = "WORKER_METRICS_TOKEN"
FINISH_REASONS = ("stop", "length", "tool_calls", "error", "abort")  # pre-created: rate() sees them from zero
# vLLM's buckets, with finer steps below 10 ms: a small model on a CPU answers in milliseconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(slots=True)
class RequestTimes:
    """One engine request's clock readings (time.perf_counter), kept on the request itself: nothing to clean up when
    a request is cancelled and never finishes."""
    submitted: float
    started: float = 0.0  # its prefill's start; 0: still waiting
    last_token: float = 0.0  # 0: no token yet


class EngineObserver:
    """What the engine reports while it runs; these no-ops serve an engine without metrics (benchmarks, tools)."""

    def submitted(self, req: GenRequest) -> None:
        """On the event loop, as the request is queued."""

    def prefilling(self, reqs: Sequence[GenRequest]) -> None:
        """On the engine thread: these requests' prefill starts now."""

    def decoded(self, rows: int) -> None:
        """On the engine thread: one decode step over `rows` rows."""

    def sampled(self, rows: Sequence[_Row]) -> None:
        """On the engine thread: each of these rows has just sampled one token."""


class _EngineGauges(Collector):
    """Read when scraped: plain ints of the engine, no lock needed (a scrape may see a step half done)."""

    def __init__(self, engine: Engine, model: str) -> None:
        self.engine, self.model = engine, model

    def collect(self) -> Iterable[Metric]:
        running, waiting, kv_tokens = self.engine.load()
        yield _gauge("worker_num_requests_running", "Rows in the running batch.", self.model, running)
        yield _gauge("worker_num_requests_waiting", "Requests queued, not yet prefilled.", self.model, waiting)
        yield _gauge("worker_kv_cache_tokens", "KV-cache columns held: batch rows x cache length (padding "
                     "included), plus the prefix cache's tokens.", self.model, kv_tokens)
        nonfinite = CounterMetricFamily("worker_nonfinite_logit_rows", "Sampled rows whose logits held NaN or inf "
                                        "(sanitised before sampling).", labels=["model"])
        nonfinite.add_metric([self.model], self.engine.stats.nonfinite_rows)
        yield nonfinite


class EngineMetrics(EngineObserver):
    """The generation worker's metrics; the engine calls it (EngineObserver), the server reports finished requests."""

    def __init__(self, model: str, max_waiting: int | None = None) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        self.throughput = TokenRate()  # tokens/s lately, for the Retry-After of a refusal (backends.admission)
        labels, r = ["model"], self.registry
        self.rejected = Counter("worker_requests_rejected", "Requests refused before reaching the engine, by reason "
                                "(overloaded: the waiting queue was full, --max-waiting).", [*labels, "reason"],
                                registry=r).labels(model, "overloaded")
        if max_waiting is not None:
            Gauge("worker_num_requests_waiting_limit", "Sequences that may wait beside a full batch before requests "
                  "are refused (--max-waiting).", labels, registry=r).labels(model).set(max_waiting)
        self._prompt = Counter("worker_prompt_tokens", "Prompt tokens prefilled (per sequence: with n > 1 each "
                               "choice's prompt counts).", labels, registry=r).labels(model)
        self._generation = Counter("worker_generation_tokens", "Tokens sampled (those of sequences cancelled later "
                                   "included).", labels, registry=r).labels(model)
        self._success = Counter("worker_request_success", "Sequences finished, by the finish_reason the client "
                                "sees (abort: the client went away).", [*labels, "finish_reason"], registry=r)
        self._finished = {reason: self._success.labels(model, reason) for reason in FINISH_REASONS}
        self._batch = Histogram("worker_batch_size", "Rows per decode step.", labels, registry=r,
                                buckets=BATCH_BUCKETS).labels(model)
        self._ttft = Histogram("worker_time_to_first_token_seconds", "From entering the engine's queue (prompt "
                               "rendered and tokenised) to the first sampled token.", labels, registry=r,
                               buckets=TTFT_BUCKETS).labels(model).observe
        self._itl = Histogram("worker_inter_token_latency_seconds", "Between consecutive sampled tokens of one "
                              "sequence.", labels, registry=r, buckets=ITL_BUCKETS).labels(model).observe
        self._e2e = Histogram("worker_e2e_request_latency_seconds", "From entering the engine's queue to the "
                              "finished answer.", labels, registry=r, buckets=REQUEST_BUCKETS).labels(model)
        self._queue = Histogram("worker_request_queue_time_seconds", "From entering the engine's queue to the "
                                "start of its prefill.", labels, registry=r, buckets=REQUEST_BUCKETS).labels(model)

    def watch(self, engine: Engine) -> None:
        self.registry.register(_EngineGauges(engine, self.model))

    # --- the engine's hooks (EngineObserver) -----------------------------------------------------------------

    def submitted(self, req: GenRequest) -> None:
        req.timing = RequestTimes(time.perf_counter())

    def prefilling(self, reqs: Sequence[GenRequest]) -> None:
        if not reqs:
            return
        now = time.perf_counter()
        for req in reqs:
            if req.timing is not None:
                req.timing.started = now
                self._queue.observe(now - req.timing.submitted)
        self._prompt.inc(sum(len(req.prompt_ids) for req in reqs))

    def decoded(self, rows: int) -> None:
        self._batch.observe(rows)

    def sampled(self, rows: Sequence[_Row]) -> None:
        # Per row: one clock value shared by the step, one observe. Nothing allocated but the floats.
        now = time.perf_counter()
        self._generation.inc(len(rows))
        self.throughput.add(len(rows), now)
        for row in rows:
            times = row.req.timing
            if times is None:
                continue
            if times.last_token:
                self._itl(now - times.last_token)
            else:
                self._ttft(now - times.submitted)
            times.last_token = now

    # --- from the server, once per sequence ------------------------------------------------------------------

    def finished(self, req: GenRequest, finish_reason: str) -> None:
        counter = self._finished.get(finish_reason)
        (counter or self._success.labels(self.model, finish_reason)).inc()
        if req.timing is not None and finish_reason != "abort":
            self._e2e.observe(time.perf_counter() - req.timing.submitted)


class EmbeddingMetrics:
    """The embedding worker's few metrics; the queue gauges are read from its batcher when scraped."""

    def __init__(self, model: str, load: Callable[[], tuple[int, int]]) -> None:
        self.model = model
        self.registry = CollectorRegistry()
        labels, r = ["model"], self.registry
        self.prompt_tokens = Counter("worker_prompt_tokens", "Input tokens of answered requests (special tokens "
                                     "included).", labels, registry=r).labels(model)
        self.e2e = Histogram("worker_e2e_request_latency_seconds", "From a request's arrival to its vectors "
                             "(answered requests).", labels, registry=r, buckets=REQUEST_BUCKETS).labels(model)
        self.registry.register(_BatcherGauges(model, load))


class _BatcherGauges(Collector):
    def __init__(self, model: str, load: Callable[[], tuple[int, int]]) -> None:
        self.model, self.load = model, load

    def collect(self) -> Iterable[Metric]:
        running, waiting = self.load()
        yield _gauge("worker_num_requests_running", "Requests being embedded.", self.model, running)
        yield _gauge("worker_num_requests_waiting", "Requests queued, not yet picked up.", self.model, waiting)


def _gauge(name: str, documentation: str, model: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["model"])
    gauge.add_metric([model], value)
    return gauge


def install_metrics_route(app: FastAPI, registry: CollectorRegistry, token: str | None) -> None:
    """GET /metrics; with a token, only for `Authorization: Bearer <token>` (else an OpenAI-shaped 401)."""
    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if token:
            require_bearer(request.headers.get("authorization"), token,
                           "The worker's /metrics needs `Authorization: Bearer <token>` with the token it was "
                           f"started with (--metrics-token or {TOKEN_ENV}).")
        # Prometheus asks for OpenMetrics in its Accept header; curl and the tests get the classic text format.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), media_type=content_type)
