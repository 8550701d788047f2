"""Anthropic's Messages API (/v1/messages) over chat, with litellm's Anthropic adapter for requests, answers and
streams (what new-api and the LiteLLM proxy do to serve Claude Code against any model). Errors on this endpoint
are Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from litellm.llms.anthropic.pass_through.adapters.streaming_iterator import AnthropicStreamWrapper
from litellm.llms.anthropic.pass_through.adapters.transformation import LiteLLMAnthropicMessagesAdapter
from litellm.types.utils import ModelResponse
from pydantic import BaseModel, Field
from starlette.responses import Response

from backends.wire.errors import APIError, bad_request
from backends.wire.requests import STRICT, RequestSchema
from relay.dialects.common import ChatChunks, StreamFailed, broke, named_event

_adapter = LiteLLMAnthropicMessagesAdapter()

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                529: "overloaded_error"}


class AnthropicMessage(BaseModel):
    model_config = STRICT
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


# Fields a content block of each type cannot do without; the translation would drop such a block silently.
_BLOCK_FIELDS = {"text": ("text",), "image": ("source",), "document": ("source",), "tool_use": ("id", "name", "input"),
                 "tool_result": ("tool_use_id",), "thinking": ("thinking",)}


class ToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: Annotated[str, Field(min_length=1, max_length=128)] | None = None


class MessagesRequest(RequestSchema):
    max_tokens: Annotated[int, Field(ge=1)]  # required, as at Anthropic
    messages: Annotated[list[AnthropicMessage], Field(min_length=1)]
    system: str | list[dict[str, Any]] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stop_sequences: Annotated[list[Annotated[str, Field(max_length=1000)]], Field(max_length=16)] | None = None
    stream: bool | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    @classmethod
    def check(cls, body: dict[str, Any]) -> None:
        for i, message in enumerate(body["messages"]):
            blocks = message["content"] if isinstance(message["content"], list) else []
            for j, block in enumerate(blocks):
                where = f"messages.{i}.content.{j}"
                if not isinstance(block.get("type"), str):
                    raise bad_request(f"{where}.type: Field required", f"{where}.type", "invalid_value")
                for name in _BLOCK_FIELDS.get(block["type"], ()):
                    if name not in block:
                        raise bad_request(f"{where}.{block['type']}.{name}: Field required", f"{where}.{name}",
                                          "invalid_value")


class CountTokensRequest(MessagesRequest):
    """/v1/messages/count_tokens: a Messages body without max_tokens (Claude Code sizes its context with it)."""

    max_tokens: Annotated[int, Field(ge=1)] | None = None  # type: ignore[assignment]


def to_chat(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The chat request, and litellm's map from shortened tool names back to the client's (OpenAI allows 64
    characters)."""
    try:
        chat, tool_names = _adapter.translate_anthropic_to_openai(body)  # type: ignore[arg-type]
    except Exception as exc:  # a content block the adapter cannot read: the request's fault
        raise bad_request(f"The messages cannot be read: {str(exc)[:200]}", "messages", "invalid_value") from None
    chat = dict(chat)
    chat.pop("metadata", None)  # litellm's, not the relay's (metadata.task)
    if chat.get("stream"):
        chat["stream_options"] = {"include_usage": True}  # the closing message_delta reports it
    return chat, tool_names


def from_chat(answer: dict[str, Any], body: dict[str, Any], tool_names: dict[str, str]) -> dict[str, Any]:
    message = _adapter.translate_openai_response_to_anthropic(ModelResponse(**answer), tool_names)
    out = message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else dict(message)
    out.setdefault("stop_sequence", None)
    return {**out, "id": f"msg_{uuid.uuid4().hex}", "model": body["model"]}


async def stream(batches: AsyncIterator[list[dict[str, Any]]], body: dict[str, Any],
                 tool_names: dict[str, str]) -> AsyncIterator[bytes]:
    """message_start, content blocks (text, tool_use) with their deltas, message_delta, message_stop; an upstream
    failure mid-stream is an `error` event, as Anthropic sends it."""
    events = AnthropicStreamWrapper(ChatChunks(batches), body["model"], tool_names)
    try:
        async for event in events:
            yield named_event(orjson.loads(orjson.dumps(event, default=_plain)))
    except StreamFailed as failed:
        status = {"server_error": 500, "rate_limit_error": 429}.get(failed.error.get("type") or "", 502)
        yield named_event(_error_body(status, str(failed.error.get("message") or "The upstream failed.")))
    except Exception as exc:  # the translation itself failed
        await broke(batches, exc)
        yield named_event(_error_body(502, "The upstream's answer cannot be expressed in this API; retry."))
    finally:
        await batches.aclose()


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    raise TypeError(type(value).__name__)


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def error_response(exc: APIError) -> Response:
    """An error of this endpoint in Anthropic's shape (the field at fault, if any, named in the message)."""
    message = exc.message if not exc.param or exc.param in exc.message else f"{exc.param}: {exc.message}"
    return Response(orjson.dumps(_error_body(exc.status, message)), status_code=exc.status,
                    media_type="application/json", headers=exc.headers)
