"""The OpenAI-compatible HTTP surface: authenticate, read and validate the body, hand to the pipeline, encode.

Bodies are read as raw bytes (backends.wire.body_limit stops an oversized one while it is read) and parsed by
backends.wire.requests (structural limits in backends.wire.json_limits), large ones and response schemas off the
event loop; the request schemas are still published in /openapi.json for clients and fuzzers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from backends.wire.event_stream import EventStreamResponse
from backends.wire.json_limits import INLINE_PARSE_BYTES
from backends.wire.requests import ChatRequest, CompletionRequest, EmbeddingRequest, check_body, parse_body
from backends.wire.responses import SSE_DONE, model_card, model_list, sse
from relay.auth import authenticate, check_model, model_allowed, presented_key
from relay.dialects import messages, responses
from relay.errors import APIError, not_found
from relay.json_check import check_response_schema, response_schema
from relay.pipeline import Pipeline, RelayCall
from relay.tokens import prompt_tokens

router = APIRouter()
_STARTED = int(time.time())


def _openapi_body(schema: type) -> dict[str, Any]:
    """The pydantic model as an OpenAPI request body, its $defs inlined."""
    spec = schema.model_json_schema()
    defs = spec.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(spec)}}}}


def _pipeline(request: Request) -> Pipeline:
    return request.app.state.pipeline


def _principal(request: Request, api_key_header: bool = False):
    client_ip = request.client.host if request.client else None
    authorization = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"),
                                  api_key_header)
    snapshot = _pipeline(request).catalog.snapshot
    if api_key_header:
        return authenticate(snapshot, authorization, client_ip, "the x-api-key header or as Authorization: Bearer "
                                                                "YOUR_KEY")
    return authenticate(snapshot, authorization, client_ip)


async def _read(request: Request, surface: str, schema: type, principal: Any, started: float,
                translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> tuple[dict[str, Any], int]:
    """The validated body (translated to chat for another API's shape) and its size; a refusal is logged."""
    raw = await request.body()

    def parse() -> dict[str, Any]:
        body = parse_body(raw, schema)
        # A translated body is held to chat's own rules too (roles, ranges, a conversation left empty).
        return body if translate is None else check_body(translate(body), ChatRequest, "after translation to chat")

    try:
        body = parse() if len(raw) <= INLINE_PARSE_BYTES else await asyncio.to_thread(parse)
        if response_schema(body) is not None:
            await asyncio.to_thread(check_response_schema, body)
    except APIError as exc:
        _pipeline(request).reject(RelayCall(surface, {"model": "(invalid request)"}, principal, started), exc)
        raise
    return body, len(raw)


def _call(request: Request, endpoint: str, body: dict[str, Any], principal: Any, started: float, size: int,
          surface: str | None = None, present: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> RelayCall:
    return RelayCall(endpoint, body, principal, started, request.headers.get("x-relay-task"),
                     request.headers.get("cache-control"), size, surface, present)


async def _relay(request: Request, endpoint: str, schema) -> Response:
    started = time.perf_counter()
    principal = _principal(request)  # a bad key is a 401 even when the body is broken too
    body, size = await _read(request, endpoint, schema, principal, started)
    result = await _pipeline(request).run(_call(request, endpoint, body, principal, started, size))
    if result.stream is not None:
        return EventStreamResponse(_framed(result.stream), headers={**result.headers, "Cache-Control": "no-cache"})
    return Response(orjson.dumps(result.body), media_type="application/json", headers=result.headers)


async def _framed(batches: AsyncIterator[list[dict[str, Any]]]) -> AsyncIterator[bytes]:
    """Server-sent events, a batch per write, `data: [DONE]` last (after an error event too, as vLLM does)."""
    try:
        async for batch in batches:
            yield sse(batch[0]) if len(batch) == 1 else b"".join(sse(event) for event in batch)
        yield SSE_DONE
    finally:
        await batches.aclose()  # a client gone mid-stream: the pipeline logs, bills and releases now, not at GC


@router.post("/v1/chat/completions", openapi_extra=_openapi_body(ChatRequest), tags=["openai"])
async def chat_completions(request: Request) -> Response:
    return await _relay(request, "chat", ChatRequest)


@router.post("/v1/completions", openapi_extra=_openapi_body(CompletionRequest), tags=["openai"])
async def completions(request: Request) -> Response:
    return await _relay(request, "completions", CompletionRequest)


@router.post("/v1/embeddings", openapi_extra=_openapi_body(EmbeddingRequest), tags=["openai"])
async def embeddings(request: Request) -> Response:
    return await _relay(request, "embeddings", EmbeddingRequest)


@router.post("/v1/responses", openapi_extra=_openapi_body(responses.ResponsesRequest), tags=["openai"])
async def responses_api(request: Request) -> Response:
    started = time.perf_counter()
    principal = _principal(request)
    original: dict[str, Any] = {}

    def translate(body: dict[str, Any]) -> dict[str, Any]:
        original.update(body)
        return responses.to_chat(body)

    chat, size = await _read(request, "responses", responses.ResponsesRequest, principal, started, translate)
    result = await _pipeline(request).run(_call(request, "chat", chat, principal, started, size, "responses",
                                                lambda answer: responses.from_chat(answer, original)))
    if result.stream is not None:
        return EventStreamResponse(responses.stream(result.stream, original),
                                   headers={**result.headers, "Cache-Control": "no-cache"})
    return Response(orjson.dumps(result.body), media_type="application/json", headers=result.headers)


@router.post("/v1/messages", openapi_extra=_openapi_body(messages.MessagesRequest), tags=["anthropic"])
async def messages_api(request: Request) -> Response:
    started = time.perf_counter()
    original: dict[str, Any] = {}
    tool_names: dict[str, str] = {}

    def translate(body: dict[str, Any]) -> dict[str, Any]:
        original.update(body)
        chat, names = messages.to_chat(body)
        tool_names.update(names)
        return chat

    try:
        principal = _principal(request, api_key_header=True)
        chat, size = await _read(request, "messages", messages.MessagesRequest, principal, started, translate)
        result = await _pipeline(request).run(_call(request, "chat", chat, principal, started, size, "messages",
                                                    lambda answer: messages.from_chat(answer, original, tool_names)))
    except APIError as exc:
        return messages.error_response(exc)
    if result.stream is not None:
        return EventStreamResponse(messages.stream(result.stream, original, tool_names),
                                   headers={**result.headers, "Cache-Control": "no-cache"})
    return Response(orjson.dumps(result.body), media_type="application/json", headers=result.headers)


@router.post("/v1/messages/count_tokens", openapi_extra=_openapi_body(messages.CountTokensRequest),
             tags=["anthropic"])
async def count_message_tokens(request: Request) -> Response:
    """The prompt's tokens as the relay counts them for quotas (the model family's tokenizer where installed);
    nothing is sent upstream or logged, but the key's request rate applies."""
    try:
        principal = _principal(request, api_key_header=True)
        raw = await request.body()
        body = await asyncio.to_thread(parse_body, raw, messages.CountTokensRequest)
        check_model(principal, body["model"])
        await _pipeline(request).accounting.limits.admit(principal)
        chat, _ = messages.to_chat(body)
        counted = await prompt_tokens("chat", chat, len(raw))
    except APIError as exc:
        return messages.error_response(exc)
    return Response(orjson.dumps({"input_tokens": counted}), media_type="application/json")


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request) -> Response:
    principal = _principal(request)
    snapshot = _pipeline(request).catalog.snapshot
    data = []
    for model in sorted(snapshot.channels_by_model):
        if model_allowed(principal, model):
            data.append(_model_card(model))
    return Response(orjson.dumps(model_list(data)), media_type="application/json")


@router.get("/v1/models/{model:path}", tags=["openai"])
async def retrieve_model(model: str, request: Request) -> Response:
    principal = _principal(request)
    snapshot = _pipeline(request).catalog.snapshot
    if model not in snapshot.channels_by_model or not model_allowed(principal, model):
        raise not_found(f"The model `{model}` does not exist or you do not have access to it.", "model",
                        "model_not_found")
    return Response(orjson.dumps(_model_card(model)), media_type="application/json")


def _model_card(model: str) -> dict:
    return model_card(model, _STARTED, "policy-relay")


@router.get("/health")
async def health(request: Request) -> Response:
    ready = getattr(request.app.state, "ready", False)
    return Response(orjson.dumps({"status": "ok" if ready else "starting"}), status_code=200 if ready else 503,
                    media_type="application/json")
