"""OpenAI's answer shapes, built in one place: a whole response, a stream chunk, usage, the model list, and the
SSE framing of a stream (`data: {json}` events ending with `data: [DONE]`)."""

from __future__ import annotations

import base64
import sys
import time
import uuid
from array import array
from typing import Any

import orjson

SSE_DONE = b"data: [DONE]\n\n"


def head(chat: bool, model: str) -> dict[str, Any]:
    """What every response and every chunk of one answer share: its id, creation time and model."""
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(head: dict[str, Any], chat: bool, choices: list[dict[str, Any]],
             usage: dict[str, Any]) -> dict[str, Any]:
    return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage}


def chunk(head: dict[str, Any], chat: bool, choices: list[dict[str, Any]],
          usage: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def embedding_list(model: str, vectors: list[list[float]], prompt_tokens: int, encoding: str | None) -> dict[str, Any]:
    """/v1/embeddings' answer; `base64` packs each vector as little-endian float32, as OpenAI does (the openai SDK
    asks for it by default and unpacks it)."""
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding)} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


# OpenAI's base64 is little-endian float32: what array("f") packs on this machine, checked once, not per vector.
_FLOAT32_LE = array("f").itemsize == 4 and sys.byteorder == "little"


def encode_vector(vector: list[float], encoding: str | None) -> list[float] | str:
    if encoding != "base64":
        return vector
    if not _FLOAT32_LE:
        raise RuntimeError("float32 little-endian packing is not available here")
    return base64.b64encode(array("f", vector).tobytes()).decode()


def decode_vector(value: list[float] | str) -> list[float]:
    """A vector as floats, whichever encoding an upstream answered in."""
    if isinstance(value, str):
        return array("f", base64.b64decode(value)).tolist()
    return value


def model_card(model: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": owned_by}


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
