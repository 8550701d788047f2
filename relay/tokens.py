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
            # use_default_image_token_count: never fetch a client's image URL (a network call on the event loop)
            return litellm.token_counter(model="gpt-4", messages=body.get("messages") or [],
                                         tools=body.get("tools") or None, use_default_image_token_count=True)
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


def output_cap(request: dict[str, Any]) -> int | None:
    """The request's own limit on completion tokens per choice, if it names one."""
    cap = request.get("max_completion_tokens") or request.get("max_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None


def output_budget(request: dict[str, Any], per_choice: int) -> int:
    """The completion tokens a request may spend: per choice, times its choices, times its prompts."""
    choices = max(_int(request.get("n")), _int(request.get("best_of")))
    prompt = request.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return per_choice * choices * prompts


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1
