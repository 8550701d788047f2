"""What both translated APIs need: the pipeline's chunk batches as litellm stream objects, and SSE framing with
named events (`event: <type>` then `data: <json>`), as OpenAI's Responses and Anthropic's Messages streams use."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import orjson  # noqa: E402
from litellm.types.utils import ModelResponseStream  # noqa: E402


class StreamFailed(Exception):
    """The pipeline ended a stream with an error event (an OpenAI error body) instead of its last chunk."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.error = error


class ChatChunks:
    """The pipeline's stream (lists of OpenAI chunk dicts) one litellm chunk object at a time; an error event
    raises StreamFailed. It stands in for the litellm stream wrapper the translators were written against
    (they read `logging_obj` and iterate it)."""

    logging_obj = None

    def __init__(self, batches: AsyncIterator[list[dict[str, Any]]]) -> None:
        self.batches = batches
        self.pending: list[dict[str, Any]] = []

    def __aiter__(self) -> ChatChunks:
        return self

    async def __anext__(self) -> ModelResponseStream:
        while not self.pending:
            self.pending = list(await anext(self.batches))  # StopAsyncIteration ends this stream too
        chunk = self.pending.pop(0)
        if "error" in chunk and "choices" not in chunk:
            raise StreamFailed(chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk)})
        return ModelResponseStream(**chunk)


async def broke(batches: Any, exc: Exception) -> None:
    """A translator failed mid-stream: the pipeline hears of it as a broken stream (logged as a 502, billed for
    what was sent) rather than as a client that left."""
    with contextlib.suppress(Exception, StopAsyncIteration):
        await batches.athrow(exc)


def named_event(payload: dict[str, Any]) -> bytes:
    kind = payload.get("type", "message")
    kind = getattr(kind, "value", kind)  # litellm's event types are str enums: their value, never their repr
    return b"event: " + str(kind).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def dump(value: Any) -> dict[str, Any]:
    """A litellm/pydantic answer object as plain JSON data, without litellm's own bookkeeping or nulls."""
    data = value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") else dict(value)
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in ("provider_specific_fields",)}
