"""Token estimates for what the relay must know before (or without) the upstream's own `usage`: the
reservation a request makes against quotas and tpm, and the bill of a stream cut off before its usage chunk.

Counted with litellm's token counter (tiktoken's cl100k, bundled: nothing is downloaded). Large prompts are
counted off the event loop, so a 16 MB body cannot stall other requests."""

from __future__ import annotations

import asyncio
from typing import Any

import litellm
import orjson

litellm.disable_hf_tokenizer_download = True  # some model names would make it fetch a tokenizer from a hub

_INLINE_LIMIT = 64 * 1024  # bodies (bytes) or texts (characters) counted on the event loop; larger: a thread


def _count(endpoint: str, body: dict[str, Any]) -> int:
    try:
        if endpoint == "chat":
            return litellm.token_counter(model="gpt-4", messages=body.get("messages") or [],
                                         tools=body.get("tools") or None)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return litellm.token_counter(model="gpt-4", text=prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            return len(prompt)  # token ids: counted as given
        if isinstance(prompt, list):
            return sum(len(p) if isinstance(p, list) else litellm.token_counter(model="gpt-4", text=str(p))
                       for p in prompt)
    except Exception:  # a shape the counter cannot read (the upstream will judge it): count by size
        pass
    return len(orjson.dumps(body.get("messages") or body.get("prompt") or "")) // 3 + 1


async def prompt_tokens(endpoint: str, body: dict[str, Any], body_bytes: int) -> int:
    if body_bytes <= _INLINE_LIMIT:
        return _count(endpoint, body)
    return await asyncio.to_thread(_count, endpoint, body)


async def text_tokens(text: str) -> int:
    if not text:
        return 0
    if len(text) <= _INLINE_LIMIT:
        return litellm.token_counter(model="gpt-4", text=text)
    return await asyncio.to_thread(litellm.token_counter, model="gpt-4", text=text)


def output_budget(request: dict[str, Any], default: int) -> int:
    """The completion tokens a request may spend: its (policy-capped) max_tokens, times its choices."""
    cap = request.get("max_completion_tokens") or request.get("max_tokens")
    per_choice = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else default
    choices = max(_int(request.get("n")), _int(request.get("best_of")))
    return per_choice * choices


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1
