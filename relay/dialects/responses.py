"""OpenAI's Responses API (/v1/responses) over chat, with litellm's translation of requests, answers and streams.

Nothing is stored: `previous_response_id` (and `conversation`) are refused with a 400 that says to send the whole
conversation in `input`, which is what stateless clients (Codex with `store: false`, the Agents SDK's default)
already do. Sampling extras that the Responses API lacks but a Qwen deployment wants (`seed`, `top_k`, `stop`,
...) are carried over to the chat request, so the policies see them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litellm.responses.litellm_completion_transformation.streaming_iterator import (
    LiteLLMCompletionStreamingIterator,
)
from litellm.responses.litellm_completion_transformation.transformation import LiteLLMCompletionResponsesConfig
from pydantic import Field

from backends.wire.errors import bad_request
from backends.wire.requests import RequestSchema, Temperature
from relay.dialects.common import ChatChunks, StreamFailed, broke, dump, named_event

# litellm's own arguments in the chat request it builds: not for an upstream.
_LITELLM_ONLY = ("custom_llm_provider", "extra_headers", "reasoning_summary", "context_management")
# Not in the Responses API, but sent by clients of vLLM and SGLang: kept for the policies and the upstream.
_SAMPLING_EXTRAS = ("seed", "top_k", "stop", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_STATEFUL = ("previous_response_id", "conversation")
# Fields an input item of each type cannot do without (an item without `type` is a message); the translation
# would otherwise drop or blank such an item silently.
_ITEM_FIELDS = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                "function_call_output": ("call_id", "output")}


class ResponsesRequest(RequestSchema):
    input: Annotated[str, Field(min_length=1)] | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stream: bool | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    background: bool | None = None

    @classmethod
    def check(cls, body: dict[str, Any]) -> None:
        for name in _STATEFUL:
            if body.get(name) is not None:
                raise bad_request(f"`{name}` is not supported: this relay stores no responses. Send the whole "
                                  "conversation in `input` (and `store: false`).", name, "unsupported_parameter")
        if body.get("background"):
            raise bad_request("`background: true` is not supported: this relay answers while the request is open and "
                              "stores nothing to poll later.", "background", "unsupported_parameter")
        items = body["input"] if isinstance(body["input"], list) else []
        for i, item in enumerate(items):
            kind = item.get("type", "message")
            for field in _ITEM_FIELDS.get(kind, ()) if isinstance(kind, str) else ("type",):
                if field not in item:
                    raise bad_request(f"Missing required parameter: 'input[{i}].{field}' (a {kind} item).", "input",
                                      "missing_required_parameter")


def _params(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("model", "input")}


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    try:
        chat = LiteLLMCompletionResponsesConfig.transform_responses_api_request_to_chat_completion_request(
            model=body["model"], input=body["input"], responses_api_request=_params(body),
            stream=bool(body.get("stream")))
    except Exception as exc:  # an input item the translation cannot read: the request's fault
        raise bad_request(f"The `input` cannot be read: {str(exc)[:200]}", "input", "invalid_value") from None
    for name in _LITELLM_ONLY:
        chat.pop(name, None)
    chat.update({k: body[k] for k in _SAMPLING_EXTRAS if k in body})
    if not chat.get("stream"):
        chat.pop("stream", None)
    return chat


def from_chat(answer: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    response = LiteLLMCompletionResponsesConfig.transform_chat_completion_response_to_responses_api_response(
        request_input=body["input"], responses_api_request=_params(body), chat_completion_response=answer)
    out = response.model_dump()
    out.pop("provider_specific_fields", None)
    (out.get("usage") or {}).pop("cost", None)
    return {**out, "id": f"resp_{uuid.uuid4().hex}", "model": body["model"], "store": False}


async def stream(batches: AsyncIterator[list[dict[str, Any]]], body: dict[str, Any]) -> AsyncIterator[bytes]:
    """Typed events (response.created … response.completed), numbered; an upstream failure mid-stream is an
    `error` event, as OpenAI sends it."""
    events = LiteLLMCompletionStreamingIterator(model=body["model"], litellm_custom_stream_wrapper=ChatChunks(batches),
                                                request_input=body["input"], responses_api_request=_params(body))
    response_id, sequence = f"resp_{uuid.uuid4().hex}", 0
    try:
        async for event in events:
            payload = dump(event)
            payload["sequence_number"] = sequence
            sequence += 1
            if isinstance(payload.get("response"), dict):
                payload["response"].update(id=response_id, model=body["model"], store=False)
                (payload["response"].get("usage") or {}).pop("cost", None)
            yield named_event(payload)
    except StreamFailed as failed:
        error = failed.error
        yield named_event({"type": "error", "code": error.get("code") or error.get("type"),
                           "message": error.get("message"), "param": error.get("param"), "sequence_number": sequence})
    except Exception as exc:  # the translation itself failed
        await broke(batches, exc)
        yield named_event({"type": "error", "code": "untranslatable_answer", "param": None, "sequence_number": sequence,
                           "message": "The upstream's answer cannot be expressed in this API; retry."})
    finally:
        await batches.aclose()
