"""The worker's HTTP server for an embedding model: OpenAI's POST /v1/embeddings, plus GET /v1/models and
GET /health shaped as the generation worker's (backends.server). Concurrent requests share forwards: one
batcher task gathers whatever is waiting and embeds it together."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from starlette.responses import Response

from backends.embedder import Embedder
from backends.metrics import EmbeddingMetrics, install_metrics_route
from backends.wire import responses as wire
from backends.wire.body_limit import BodyLimit
from backends.wire.errors import APIError, bad_request, install_handlers, not_found
from backends.wire.requests import EmbeddingRequest, embedding_inputs, parse_body


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


@dataclass
class Job:
    rows: list[list[int]]  # one request's inputs as token ids, special tokens included, truncated
    future: asyncio.Future = field(repr=False)  # -> torch.Tensor [len(rows), D] float32
    cancelled: bool = False  # its client went away: rows not embedded yet are skipped
    order: list[int] = field(default_factory=list)  # its rows shortest first: fewer pad tokens per forward
    done: int = 0  # rows of `order` embedded so far
    out: torch.Tensor | None = None  # [len(rows), D] float32, filled as forwards finish

    @property
    def remaining(self) -> int:
        return len(self.rows) - self.done


class Batcher:
    """One task owns the model and runs one forward at a time, in a thread (the event loop stays free to parse the
    next requests meanwhile). Each forward takes rows from every open request in turn — one row each, round after
    round, shortest rows of each first — up to `max_batch` rows and `max_tokens` padded tokens: a request of 2,048
    long texts is embedded a forward at a time beside everyone else's, never ahead of them all."""

    def __init__(self, embedder: Embedder, max_batch: int = 32, max_tokens: int = 8192):
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.open: list[Job] = []
        self.active = 0  # rows in the current forward
        self.embedded = 0  # rows embedded so far
        self.skipped = 0  # rows not embedded because their client had gone

    def submit(self, rows: list[list[int]]) -> Job:
        job = Job(rows, asyncio.get_running_loop().create_future(), order=sorted(range(len(rows)),
                                                                                key=lambda i: len(rows[i])))
        job.out = torch.empty(len(rows), self.embedder.dimension)
        self.queue.put_nowait(job)
        return job

    async def run(self) -> None:
        while True:
            if not self.open:
                self.open.append(await self.queue.get())
            while not self.queue.empty():
                self.open.append(self.queue.get_nowait())
            self.open = [job for job in self.open if self._live(job)]
            picked = self._pick()
            if not picked:
                continue
            self.active = len(picked)
            try:
                vectors = await asyncio.to_thread(self.embedder.forward, [job.rows[i] for job, i in picked])  # [B, D]
            except Exception as exc:  # the forward failed: its requests answer 500, the task lives on
                for job, _ in picked:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self.active = 0
            for (job, i), vector in zip(picked, vectors, strict=True):
                job.out[i] = vector  # type: ignore[index]
            self.embedded += len(picked)
            for job in self.open:
                if not job.remaining and not job.future.done():
                    job.future.set_result(job.out)

    def _live(self, job: Job) -> bool:
        if job.future.done():
            return False
        if job.cancelled:
            self.skipped += job.remaining
            return False
        return True

    def _pick(self) -> list[tuple[Job, int]]:
        """The next forward's rows: one from each open request in turn, within the row and padded-token budget."""
        picked: list[tuple[Job, int]] = []
        longest = 0
        while len(picked) < self.max_batch and any(job.remaining for job in self.open):
            for job in self.open:
                if not job.remaining or len(picked) == self.max_batch:
                    continue
                row = job.order[job.done]
                width = max(longest, len(job.rows[row]))
                if picked and (len(picked) + 1) * width > self.max_tokens:
                    return picked
                picked.append((job, row))
                job.done += 1
                longest = width
        return picked


def create_embedding_app(embedder: Embedder, max_batch: int = 32, max_tokens: int = 8192,
                         max_body_mb: float = 16, metrics_token: str | None = None) -> FastAPI:
    """`max_batch` rows and `max_tokens` padded tokens per forward bound the memory of one forward;
    `metrics_token`: GET /metrics then needs `Authorization: Bearer <token>`."""
    batcher = Batcher(embedder, max_batch=max_batch, max_tokens=max_tokens)
    name = embedder.name
    # read on the event loop, which is also where the batcher changes them
    metrics = EmbeddingMetrics(name, lambda: (sum(not job.future.done() for job in batcher.open),
                                              batcher.queue.qsize()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher.run())
        app.state.ready = True
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="policy-relay embedding worker", lifespan=lifespan)
    app.state.ready = False
    app.state.embedder = embedder
    app.state.batcher = batcher
    max_body = int(max_body_mb * 1024 * 1024)
    app.add_middleware(BodyLimit, max_bytes=max_body, setting="--max-body-mb")
    install_handlers(app, max_body, "--max-body-mb")
    install_metrics_route(app, metrics.registry, metrics_token)

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok" if app.state.ready else "starting", "model": name,
                      "device": str(embedder.device), "dtype": str(embedder.model.dtype).removeprefix("torch."),
                      "active": batcher.active, "queued": batcher.queue.qsize(), "forwards": embedder.forwards,
                      "embedded": batcher.embedded, "skipped": batcher.skipped},
                     200 if app.state.ready else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(wire.model_list([wire.model_card(name, 0, "policy-relay-worker")]))

    @app.post("/v1/chat/completions")
    @app.post("/v1/completions")
    async def generation(request: Request) -> Response:
        raise bad_request(f"This worker serves the embedding model `{name}` and answers only /v1/embeddings; "
                          f"{request.url.path} needs a worker started with a generation model (e.g. smollm2-135m).",
                          "model")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        start = time.perf_counter()
        body = parse_body(await request.body(), EmbeddingRequest)
        if body["model"] not in (name, "default"):
            raise not_found(f"The model `{body['model']}` does not exist; this worker serves `{name}`.",
                            "model", "model_not_found")
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions > embedder.dimension:
            raise bad_request(f"`{name}` embeds into {embedder.dimension} dimensions; `dimensions` may shorten its "
                              f"vectors but not lengthen them (got {dimensions}).", "dimensions", "invalid_value")
        # Tokenising (and checking ids) is CPU work: not on the event loop.
        rows = await asyncio.to_thread(_rows, embedder, embedding_inputs(body))
        vectors = await _wait(batcher.submit(rows), request)  # [N, D] float32
        if dimensions is not None and dimensions < embedder.dimension:
            # text-embedding-3's `dimensions`: the leading components, scaled back to unit length
            vectors = F.normalize(vectors[:, :dimensions], p=2, dim=-1)  # [N, dimensions] float32
        tokens = sum(len(r) for r in rows)
        metrics.prompt_tokens.inc(tokens)
        metrics.e2e.observe(time.perf_counter() - start)
        return _json(wire.embedding_list(body["model"], vectors.tolist(), tokens, body.get("encoding_format")))

    return app


def _rows(embedder: Embedder, inputs: list[str] | list[list[int]]) -> list[list[int]]:
    """Inputs -> the ids embedded. Token-id inputs are a text's ids without special tokens (as
    tokenizer(text, add_special_tokens=False) gives them): they are wrapped and truncated just as the text is."""
    if isinstance(inputs[0], str):
        return [embedder.wrap(ids) for ids in embedder.content_ids(inputs)]
    for k, ids in enumerate(inputs):
        if (top := max(ids)) >= embedder.vocab_size:
            where = f"input[{k}]" if len(inputs) > 1 else "input"
            raise bad_request(f"Token id {top} in {where} is out of range: `{embedder.name}`'s vocabulary has "
                              f"{embedder.vocab_size} tokens (ids 0 to {embedder.vocab_size - 1}).", "input",
                              "invalid_value")
    return [embedder.wrap(ids) for ids in inputs]


async def _wait(job: Job, request: Request) -> torch.Tensor:
    """The job's vectors; if the client goes away first, the job is marked so its batch skips it."""
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.5)
            if done:
                return job.future.result()
            if await request.is_disconnected():
                raise APIError(499, "The client closed the request.", "invalid_request_error")
    finally:
        if not job.future.done():
            job.cancelled = True
