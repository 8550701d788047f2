"""The worker's HTTP server for an embedding model: OpenAI's POST /v1/embeddings, plus GET /v1/models and
GET /health shaped as the generation worker's (backends.server). Concurrent requests share forwards: one
batcher task gathers whatever is waiting and embeds it together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import torch
import torch.nn.functional as F
from fastapi import FastAPI, Request
from starlette.responses import Response

from backends.embedder import Embedder
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


class Batcher:
    """One task owns the model. Each time it wakes it takes every job waiting (up to `max_inputs` rows, but at
    least one job), sorts their rows by length so short rows are not padded to long ones, and embeds them in
    forwards of at most `max_batch` rows and `max_tokens` padded tokens, one forward at a time in a thread (the
    event loop stays free to parse the next requests meanwhile; those make up the next wake's batch)."""

    def __init__(self, embedder: Embedder, max_batch: int = 32, max_tokens: int = 8192, max_inputs: int = 256):
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.max_inputs = max_inputs
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.active = 0  # rows taken by the current wake
        self.embedded = 0  # rows embedded so far
        self.skipped = 0  # rows not embedded because their client had gone

    def submit(self, rows: list[list[int]]) -> Job:
        job = Job(rows, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return job

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            taken = len(jobs[0].rows)
            while taken < self.max_inputs and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                taken += len(jobs[-1].rows)
            self.active = taken
            try:
                await self._embed(jobs)
            except Exception as exc:  # the forward failed: every waiting request answers 500, the task lives on
                for job in jobs:
                    if not job.future.done() and not job.cancelled:
                        job.future.set_exception(exc)
            finally:
                self.active = 0

    async def _embed(self, jobs: list[Job]) -> None:
        order = sorted((len(row), j, i) for j, job in enumerate(jobs) for i, row in enumerate(job.rows))
        out = [torch.empty(len(job.rows), self.embedder.dimension) for job in jobs]  # [N_j, D] float32 per job
        for chunk in self._chunks(order):
            live = [(j, i) for _, j, i in chunk if not jobs[j].cancelled and not jobs[j].future.done()]
            self.skipped += len(chunk) - len(live)
            if not live:
                continue
            vectors = await asyncio.to_thread(self.embedder.forward, [jobs[j].rows[i] for j, i in live])  # [B, D]
            for (j, i), vector in zip(live, vectors, strict=True):
                out[j][i] = vector
            self.embedded += len(live)
        for job, vectors in zip(jobs, out, strict=True):
            if not job.future.done() and not job.cancelled:
                job.future.set_result(vectors)

    def _chunks(self, order: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
        """Rows in ascending length cut into forwards; a forward pads every row to its last (longest) one."""
        chunk: list[tuple[int, int, int]] = []
        for item in order:
            if chunk and (len(chunk) == self.max_batch or (len(chunk) + 1) * item[0] > self.max_tokens):
                yield chunk
                chunk = []
            chunk.append(item)
        if chunk:
            yield chunk


def create_embedding_app(embedder: Embedder, max_batch: int = 32, max_tokens: int = 8192,
                         max_body_mb: float = 16) -> FastAPI:
    """`max_batch` rows and `max_tokens` padded tokens per forward bound the memory of one forward."""
    batcher = Batcher(embedder, max_batch=max_batch, max_tokens=max_tokens)
    name = embedder.name

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
        return _json(wire.embedding_list(body["model"], vectors.tolist(), sum(len(r) for r in rows),
                                         body.get("encoding_format")))

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
