"""The worker's OpenAI-compatible HTTP server around one Engine (the protocol itself is backends.wire)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from backends import answers
from backends.admission import Admission, Ticket, default_max_waiting, queue_timing, sequences
from backends.answers import ChoiceBuilder
from backends.engine import DoneEvent, Engine, GenRequest
from backends.grammar import GrammarError, Grammars
from backends.loading import LoadedModel
from backends.metrics import EngineMetrics, install_metrics_route
from backends.protocol import Plan, WorkerChatRequest, WorkerCompletionRequest, chat_plan, completion_plan
from backends.vocab import Vocab
from backends.wire import responses as wire
from backends.wire.body_limit import BodyLimit
from backends.wire.errors import APIError, bad_request, install_handlers, not_found
from backends.wire.event_stream import EventStreamResponse
from backends.wire.requests import parse_body


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


class _SubmittedStream(EventStreamResponse):
    """A stream whose engine requests are already submitted: however the response ends (even before its body
    starts, when the client left at once), `close` cancels them and gives their admission back."""

    def __init__(self, content: AsyncIterator[bytes], headers: dict[str, str], close: Callable[[], None]) -> None:
        super().__init__(content, headers)
        self.close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()


class Worker:
    def __init__(self, lm: LoadedModel, engine: Engine, vocab: Vocab, metrics: EngineMetrics) -> None:
        self.lm = lm
        self.engine = engine
        self.vocab = vocab
        self.metrics = metrics

    def requests(self, plan: Plan, grammar: Any) -> list[GenRequest]:
        """One engine request per (prompt, choice); choice i of a seeded request uses seed + i."""
        return [GenRequest(prompt_ids=prompt, params=plan.params, max_tokens=plan.max_tokens, stop=plan.stop,
                           top_logprobs=plan.top_logprobs, seed=None if plan.seed is None else plan.seed + i,
                           grammar=grammar, constraint=plan.constraint, prompt_logprobs=plan.prompt_logprobs)
                for prompt in plan.prompts for i in range(plan.n)]

    def builders(self, plan: Plan, chat: bool, prompt_texts: list[str]) -> list[ChoiceBuilder]:
        return [ChoiceBuilder(i, chat, plan, self.vocab, prompt_texts[i // plan.n])
                for i in range(len(plan.prompts) * plan.n)]

    async def collect(self, req: GenRequest, builder: ChoiceBuilder, request: Request,
                      ticket: Ticket) -> ChoiceBuilder:
        """Run one request to the end; cancels it if the client goes away."""
        events = self.engine.submit(req)
        checked = time.monotonic()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    event = None
                if time.monotonic() - checked >= 0.5:  # also while tokens flow: a long answer is still cancelled
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        req.cancelled = True
                        raise APIError(499, "The client closed the request.", "invalid_request_error")
                if event is None:
                    continue
                answers.apply(builder, event)
                if isinstance(event, DoneEvent):
                    ticket.done(None if event.finish_reason == "error" else event.completion_tokens)
                    self.metrics.finished(req, builder.finish_reason)
                    return builder
        except (asyncio.CancelledError, APIError):
            self.metrics.finished(req, "abort")
            raise


async def _first_event(events: asyncio.Queue, request: Request) -> Any:
    """The next event; a 499 if the client leaves meanwhile (checked every half second)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                raise APIError(499, "The client closed the request.", "invalid_request_error") from None


def create_worker_app(lm: LoadedModel, max_batch: int = 32, max_prefill_tokens: int | None = None,
                      max_body_mb: float = 16, metrics_token: str | None = None,
                      max_waiting: int | None = None) -> FastAPI:
    """`metrics_token`: GET /metrics then needs `Authorization: Bearer <token>`. `max_waiting`: sequences that
    may wait beside a full batch (default 4 × max_batch); more are refused with a 503 (backends.admission)."""
    vocab = Vocab(lm.tokenizer, lm.model.get_output_embeddings().weight.shape[0])
    grammars = Grammars(vocab, sorted(lm.eos_token_ids))
    max_waiting = default_max_waiting(max_batch) if max_waiting is None else max_waiting
    metrics = EngineMetrics(lm.name, max_waiting=max_waiting)
    admission = Admission(max_batch, max_waiting, metrics.throughput, metrics.rejected.inc)
    engine = Engine(lm, grammars, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens, observer=metrics)
    metrics.watch(engine)
    worker = Worker(lm, engine, vocab, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        app.state.ready = True
        yield
        engine.stop()

    app = FastAPI(title="policy-relay worker", lifespan=lifespan)
    app.state.ready = False
    app.state.worker = worker
    max_body = int(max_body_mb * 1024 * 1024)
    app.add_middleware(BodyLimit, max_bytes=max_body, setting="--max-body-mb")
    install_handlers(app, max_body, "--max-body-mb")
    install_metrics_route(app, metrics.registry, metrics_token)

    def check_model(body: dict[str, Any]) -> None:
        if body["model"] not in (lm.name, "default"):
            raise not_found(f"The model `{body['model']}` does not exist; this worker serves `{lm.name}`.",
                            "model", "model_not_found")

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok" if app.state.ready else "starting", "model": lm.name,
                      "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
                      "active": engine.active, "decode_steps": engine.steps,
                      "nonfinite_logit_rows": engine.stats.nonfinite_rows},
                     200 if app.state.ready else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(wire.model_list([wire.model_card(lm.name, 0, "policy-relay-worker")]))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await respond(request, WorkerChatRequest, chat_plan, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, WorkerCompletionRequest, completion_plan, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        raise bad_request(f"This worker serves a generation model (`{lm.name}`), not an embedding model; start a "
                          "worker with an embedding model such as all-minilm-l6-v2 "
                          "(`python -m backends --model all-minilm-l6-v2`) for /v1/embeddings.", "model")

    async def respond(request: Request, schema: type, make_plan: Any, chat: bool) -> Response:
        body = parse_body(await request.body(), schema)
        check_model(body)
        ticket = admission.admit(sequences(body))  # before any rendering or tokenising: a refusal stays cheap
        streaming = False
        try:
            # Tokenising and rendering the template (and compiling a grammar) take CPU: not on the event loop.
            plan: Plan = await asyncio.to_thread(make_plan, body, lm)
            grammar = None
            if plan.constraint is not None:
                try:
                    grammar = await asyncio.to_thread(grammars.compile, plan.constraint)
                except GrammarError as exc:
                    raise bad_request(f"The constraint cannot be compiled: {exc}", plan.constraint.param) from None
            reqs = worker.requests(plan, grammar)
            prompt_texts = _prompt_texts(body, plan, lm) if plan.echo else [""] * len(plan.prompts)
            builders = worker.builders(plan, chat, prompt_texts)
            head = wire.head(chat, body["model"])
            prompt_tokens = sum(len(p) for p in plan.prompts)
            if body.get("stream"):
                include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                streaming = True  # from here the stream gives the ticket back
                return await start_stream(request, reqs, builders, head, chat, prompt_tokens, include_usage, ticket)
            try:
                await asyncio.gather(*(worker.collect(r, b, request, ticket)
                                       for r, b in zip(reqs, builders, strict=True)))
            except (asyncio.CancelledError, APIError):
                for r in reqs:
                    r.cancelled = True
                raise
        finally:
            if not streaming:
                ticket.close()
        if any(b.done is None or b.done.finish_reason == "error" for b in builders):
            raise APIError(500, "The worker failed while generating; retry.", "server_error")
        completion_tokens = sum(b.done.completion_tokens for b in builders)
        answer = wire.response(head, chat, [b.choice() for b in builders],
                               wire.usage(prompt_tokens, completion_tokens))
        if chat and (prompt := builders[0].prompt_logprobs()) is not None:
            answer["prompt_logprobs"] = prompt  # vLLM puts a chat answer's on the answer itself
        return _json(answer, headers=queue_timing(reqs))

    async def start_stream(request: Request, reqs: list[GenRequest], builders: list[ChoiceBuilder],
                           head: dict[str, Any], chat: bool, prompt_tokens: int, include_usage: bool,
                           ticket: Ticket) -> Response:
        """Submits the sequences and starts the response with the first engine event (a prefill done), so its
        headers can carry the queue time (Server-Timing); the first token goes out with them, no later than it
        would have anyway."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, events: asyncio.Queue) -> None:
            while True:
                event = await events.get()
                merged.put_nowait((index, event))
                if isinstance(event, DoneEvent):
                    ticket.done(None if event.finish_reason == "error" else event.completion_tokens)
                    return

        pumps = [asyncio.create_task(pump(i, worker.engine.submit(r))) for i, r in enumerate(reqs)]
        closed = False

        def close() -> None:  # the client went away (or we are done): stop decoding, give the places back
            nonlocal closed
            if closed:
                return
            closed = True
            for r, b in zip(reqs, builders, strict=True):
                if b.done is None:
                    metrics.finished(r, "abort")
                r.cancelled = True
            for task in pumps:
                task.cancel()
            ticket.close()

        try:
            first = await _first_event(merged, request)
        except BaseException:
            close()
            raise
        return _SubmittedStream(stream(first, merged, reqs, builders, head, chat, prompt_tokens, include_usage,
                                       close), queue_timing(reqs), close)

    async def stream(first: tuple[int, Any] | None, merged: asyncio.Queue, reqs: list[GenRequest],
                     builders: list[ChoiceBuilder], head: dict[str, Any], chat: bool, prompt_tokens: int,
                     include_usage: bool, close: Callable[[], None]) -> AsyncIterator[bytes]:
        open_choices = len(reqs)
        try:
            if chat:
                for i in range(len(reqs)):
                    role = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield wire.sse(wire.chunk(head, chat, [role]))
            while open_choices:
                index, event = first if first is not None else await merged.get()
                first = None
                choices = answers.apply(builders[index], event)
                if isinstance(event, DoneEvent):
                    open_choices -= 1
                    metrics.finished(reqs[index], builders[index].finish_reason)
                    if event.finish_reason == "error":
                        yield wire.sse(APIError(500, "The worker failed while generating; retry.",
                                                "server_error").body())
                        yield wire.SSE_DONE
                        return
                for choice in choices:
                    yield wire.sse(wire.chunk(head, chat, [choice]))
            if include_usage:
                completion_tokens = sum(b.done.completion_tokens for b in builders if b.done)
                yield wire.sse(wire.chunk(head, chat, [], wire.usage(prompt_tokens, completion_tokens)))
            yield wire.SSE_DONE
        finally:
            close()

    return app


def _prompt_texts(body: dict[str, Any], plan: Plan, lm: LoadedModel) -> list[str]:
    """What echo gives back: the prompts as the client wrote them (token ids decoded)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [lm.tokenizer.decode(p) for p in plan.prompts]
