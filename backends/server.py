"""The worker's OpenAI-compatible HTTP server around one Engine (the protocol itself is backends.wire)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from backends.engine import DoneEvent, Engine, GenRequest, TokenEvent
from backends.loading import LoadedModel
from backends.protocol import Plan, WorkerChatRequest, WorkerCompletionRequest, chat_plan, completion_plan
from backends.wire import responses as wire
from backends.wire.body_limit import BodyLimit
from backends.wire.errors import APIError, install_handlers, not_found
from backends.wire.requests import parse_body


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def _name(token_id: int, text: str, as_ids: bool) -> str:
    return f"token_id:{token_id}" if as_ids else text


def _chat_logprobs(tokens: list[dict[str, Any]], as_ids: bool) -> list[dict[str, Any]]:
    def one(token_id: int, text: str, lp: float) -> dict[str, Any]:
        name = _name(token_id, text, as_ids)
        return {"token": name, "logprob": lp, "bytes": list(name.encode())}

    return [{**one(t["id"], t["text"], t["logprob"]), "top_logprobs": [one(*alt) for alt in t.get("top", [])]}
            for t in tokens if "logprob" in t]


def _completion_logprobs(tokens: list[dict[str, Any]], offset: int, as_ids: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        if "logprob" not in t:
            continue
        out["tokens"].append(_name(t["id"], t["text"], as_ids))
        out["token_logprobs"].append(t["logprob"])
        out["top_logprobs"].append({_name(i, x, as_ids): v for i, x, v in t.get("top", [])})
        out["text_offset"].append(offset)
        offset += len(t["text"])
    return out


class Worker:
    def __init__(self, lm: LoadedModel, engine: Engine) -> None:
        self.lm = lm
        self.engine = engine

    def requests(self, plan: Plan) -> list[GenRequest]:
        """One engine request per (prompt, choice); choice i of a seeded request uses seed + i."""
        return [GenRequest(prompt_ids=prompt, params=plan.params, max_tokens=plan.max_tokens or 256,
                           stop=plan.stop, top_logprobs=plan.top_logprobs,
                           seed=None if plan.seed is None else plan.seed + i)
                for prompt in plan.prompts for i in range(plan.n)]

    async def collect(self, req: GenRequest, request: Request) -> tuple[str, list[dict], DoneEvent]:
        """Run one request to the end; cancels it if the client goes away."""
        events = self.engine.submit(req)
        text, tokens = [], []
        checked = time.monotonic()
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
            if isinstance(event, DoneEvent):
                return "".join(text), tokens, event
            text.append(event.text)
            tokens.extend(event.tokens)


def create_worker_app(lm: LoadedModel, max_batch: int = 32, max_body_mb: float = 16) -> FastAPI:
    engine = Engine(lm, max_batch=max_batch)
    worker = Worker(lm, engine)

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
        return _json({"object": "list", "data": [{"id": lm.name, "object": "model", "created": 0,
                                                   "owned_by": "policy-relay-worker"}]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await respond(request, WorkerChatRequest, chat_plan, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, WorkerCompletionRequest, completion_plan, chat=False)

    async def respond(request: Request, schema: type, make_plan: Any, chat: bool) -> Response:
        body = parse_body(await request.body(), schema)
        check_model(body)
        plan: Plan = make_plan(body, lm)
        reqs = worker.requests(plan)
        head = wire.head(chat, body["model"])
        prompt_tokens = sum(len(p) for p in plan.prompts)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(reqs, head, chat, prompt_tokens, include_usage, plan.token_ids),
                                     media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(worker.collect(r, request) for r in reqs))
        except (asyncio.CancelledError, APIError):
            for r in reqs:
                r.cancelled = True
            raise
        if any(done.finish_reason == "error" for _, _, done in results):
            raise APIError(500, "The worker failed while generating; retry.", "server_error")
        choices = []
        with_lp = plan.top_logprobs is not None
        for index, (text, tokens, done) in enumerate(results):
            if chat:
                lp = {"content": _chat_logprobs(tokens, plan.token_ids)} if with_lp else None
                choice = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                          "finish_reason": done.finish_reason}
            else:
                lp = _completion_logprobs(tokens, 0, plan.token_ids) if with_lp else None
                choice = {"index": index, "text": text, "finish_reason": done.finish_reason, "logprobs": lp}
            choices.append(choice)
        completion_tokens = sum(done.completion_tokens for _, _, done in results)
        return _json(wire.response(head, chat, choices, wire.usage(prompt_tokens, completion_tokens)))

    async def stream(reqs: list[GenRequest], head: dict[str, Any], chat: bool, prompt_tokens: int,
                     include_usage: bool, as_ids: bool) -> AsyncIterator[bytes]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, req: GenRequest) -> None:
            events = worker.engine.submit(req)
            while True:
                event = await events.get()
                await merged.put((index, event))
                if isinstance(event, DoneEvent):
                    return

        def chunk(index: int, delta_text: str | None, tokens: list[dict], finish: str | None,
                  first: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if delta_text:
                    delta["content"] = delta_text
                choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
                if tokens and reqs[index].top_logprobs is not None:
                    choice["logprobs"] = {"content": _chat_logprobs(tokens, as_ids)}
            else:
                choice = {"index": index, "text": delta_text or "", "finish_reason": finish}
                if tokens and reqs[index].top_logprobs is not None:
                    choice["logprobs"] = _completion_logprobs(tokens, offsets[index], as_ids)
                    offsets[index] += sum(len(t["text"]) for t in tokens)
            return wire.sse(wire.chunk(head, chat, [choice]))

        offsets = [0] * len(reqs)  # text_offset of each completion choice's next token
        pumps = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        completion_tokens, open_choices = 0, len(reqs)
        try:
            if chat:
                for i in range(len(reqs)):
                    yield chunk(i, None, [], None, first=True)
            while open_choices:
                index, event = await merged.get()
                if isinstance(event, TokenEvent):
                    if event.text or event.tokens:
                        yield chunk(index, event.text, event.tokens, None)
                    continue
                open_choices -= 1
                completion_tokens += event.completion_tokens
                if event.finish_reason == "error":
                    yield wire.sse(APIError(500, "The worker failed while generating; retry.", "server_error").body())
                    yield wire.SSE_DONE
                    return
                yield chunk(index, None, [], event.finish_reason)
            if include_usage:
                yield wire.sse(wire.chunk(head, chat, [], wire.usage(prompt_tokens, completion_tokens)))
            yield wire.SSE_DONE
        finally:
            for r in reqs:  # the client went away (or we are done): stop decoding for it
                r.cancelled = True
            for task in pumps:
                task.cancel()

    return app
