"""Shared dispatch through litellm for every litellm-backed channel type.

Subclasses say only how a model name becomes a litellm model string and which connection
arguments to add; calls, streaming, response cleaning and error classification live here."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import litellm  # noqa: E402
import openai  # noqa: E402
from litellm.litellm_core_utils import litellm_logging  # noqa: E402

from channels import errors  # noqa: E402
from channels.base import OPENAI_FIELDS, Channel, UpstreamError, request_id_header  # noqa: E402

litellm.telemetry = False
litellm.suppress_debug_info = True


def _no_cost(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


# litellm prices every response from its model cost map (~1 ms of CPU per call, a fifth of its whole cost).
# The relay bills from the upstream's own `usage`, so that price is never read: skip computing it.
# litellm is pinned; the attribute check makes an upgrade that moves this method fail loudly at import.
assert hasattr(litellm_logging.Logging, "response_cost_calculator"), "litellm internals changed"
litellm_logging.Logging.response_cost_calculator = _no_cost  # type: ignore[method-assign]
# litellm logs every call at INFO; at relay rates that is noise and CPU.
for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# litellm adds its own bookkeeping to every object; clients of an OpenAI API must not see it.
_PRIVATE_KEYS = frozenset({"provider_specific_fields", "_hidden_params", "_response_ms"})
# OpenAI's own request fields of each endpoint go to litellm as arguments (so it translates them for providers
# that are not OpenAI-compatible), as do the OpenAI fields it translates that an operator may let through a
# channel's passthrough. Anything else travels in `extra_body`, so it reaches the upstream's JSON (vLLM's
# top_k, ...) but can never be taken by litellm as one of its own arguments (api_base, headers, mock_response).
_LITELLM_ARGS = {
    "chat": OPENAI_FIELDS["chat"] | {"user", "store", "service_tier", "modalities", "audio", "prediction"},
    "completions": OPENAI_FIELDS["completions"] | {"user"},
    "embeddings": OPENAI_FIELDS["embeddings"] | {"user"},
}
_NOT_FORWARDED = frozenset({"model", "metadata"})  # metadata carries relay hints (metadata.task)


def clean(value: Any) -> Any:
    """Drop litellm's private fields and None values (but keep a message's null content)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in _PRIVATE_KEYS or (v is None and k not in ("content", "finish_reason")):
                continue
            out[k] = clean(v)
        return out
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def _clean_chunk(chunk: Any) -> dict[str, Any]:
    data = clean(chunk.model_dump())
    text_completion = data.get("object") == "text_completion"
    for choice in data.get("choices", []):
        if text_completion:
            choice.setdefault("text", "")  # OpenAI's final completion chunk carries text ""
        delta = choice.get("delta")
        if delta and delta.get("content", "") is None:  # a delta's null content is noise, unlike a message's
            del delta["content"]
    # OpenAI's final usage chunk has no choices; litellm gives it one empty delta.
    if data.get("usage") and all(not c.get("delta") and not c.get("finish_reason") and not c.get("text")
                                 for c in data.get("choices", [])):
        data["choices"] = []
    return data


_TIMEOUTS = (litellm.Timeout, openai.APITimeoutError, TimeoutError, httpx.TimeoutException)
_NETWORK = (ConnectionError, socket.gaierror, httpx.TransportError, aiohttp.ClientConnectionError)


def classify(exc: Exception) -> UpstreamError:
    """litellm/openai exceptions as upstream errors (channels.errors decides what each status means)."""
    chain = _causes(exc)
    if any(isinstance(e, _TIMEOUTS) for e in chain):
        return errors.timeout()
    # litellm reports a refused connection as a 500 "InternalServerError"; the cause chain knows better.
    if any(isinstance(e, _NETWORK) for e in chain):
        return errors.unreachable()
    unsendable = _unsendable(exc, chain)
    if unsendable is not None:
        return unsendable
    status = getattr(exc, "status_code", None)
    if isinstance(exc, litellm.ContextWindowExceededError | litellm.UnsupportedParamsError):
        status = 400
    return errors.from_status(status, _provider_error(exc), _provider_text(exc),
                              errors.retry_after(getattr(getattr(exc, "response", None), "headers", None)))


def _unsendable(exc: Exception, chain: list[BaseException]) -> UpstreamError | None:
    """litellm could not build the upstream request from this body (nothing was sent): the request's 400,
    never a failure of the channel."""
    for error in chain:  # the SDK's signature refused an argument of this endpoint
        match = re.search(r"unexpected keyword argument '([^']+)'", str(error)) if isinstance(error, TypeError) \
            else None
        if match:
            return UpstreamError(400, f"This endpoint does not take the parameter `{match.group(1)}`.",
                                 retryable=False, kind="invalid_request_error", param=match.group(1))
    if isinstance(exc, litellm.APIConnectionError):  # no network error behind it (checked before)
        return UpstreamError(400, "This request cannot be sent to the upstream in this form.", retryable=False,
                             kind="invalid_request_error")
    return None


def _provider_error(exc: Exception) -> dict[str, Any]:
    """The upstream's own `error` object, from the SDK's parsed body or litellm's message text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        return body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    text = str(getattr(exc, "message", None) or exc)
    if "{" in text:
        with contextlib.suppress(ValueError, TypeError):
            data = json.loads(text[text.index("{"):])
            error = data.get("error", data) if isinstance(data, dict) else None
            return error if isinstance(error, dict) else {}
    return {}


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _provider_text(exc: Exception) -> str:
    """litellm's message without its own prefixes ("litellm.BadRequestError: OpenAIException - ...")."""
    text = str(getattr(exc, "message", None) or exc)
    for marker in ("Exception - ", "Error: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text


class LiteLLMChannel(Channel):
    type_name = "litellm"

    def litellm_model(self, upstream_model: str) -> str:
        """`options.model` wins (one provider model per channel); otherwise the mapped name is itself
        a litellm model string such as `anthropic/claude-3-5-haiku`."""
        return self.config.options.get("model") or upstream_model

    def text_model(self, upstream_model: str) -> str:
        return self.litellm_model(upstream_model)

    def connection_kwargs(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.config.options.items() if k != "model"}
        if self.config.base_url:
            kwargs["api_base"] = self.config.base_url
        if self.config.api_key:
            kwargs["api_key"] = self.config.api_key
        return kwargs

    def _kwargs(self, request: dict[str, Any], *, text: bool = False, endpoint: str = "chat") -> dict[str, Any]:
        fields = _LITELLM_ARGS["completions" if text else endpoint]
        body = {k: v for k, v in request.items() if k in fields}
        extra = {k: v for k, v in request.items() if k not in fields and k not in _NOT_FORWARDED}
        if extra:
            body["extra_body"] = extra
        body["model"] = (self.text_model if text else self.litellm_model)(request["model"])
        # _skip_mcp_handler: without it litellm 1.106 routes every request that has `tools` through its
        # MCP gateway, which imports the proxy-only `mcp` package and fails.
        kwargs = {**body, **self.connection_kwargs(), "timeout": self.config.timeout_s, "num_retries": 0}
        if endpoint != "embeddings":  # aembedding would send these to the provider as body fields
            kwargs["_skip_mcp_handler"] = True
            if headers := request_id_header():
                kwargs["extra_headers"] = {**(kwargs.get("extra_headers") or {}), **headers}
        return kwargs

    async def _call(self, function: Any, request: dict[str, Any], *, text: bool, endpoint: str = "chat"
                    ) -> dict[str, Any]:
        try:
            response = await function(**self._kwargs(request, text=text, endpoint=endpoint))
        except Exception as exc:
            raise classify(exc) from exc
        return clean(response.model_dump())

    async def _stream(self, function: Any, request: dict[str, Any], *, text: bool) -> AsyncIterator[dict[str, Any]]:
        try:
            stream = await function(**self._kwargs(request, text=text))
            async for chunk in stream:
                yield _clean_chunk(chunk)
        except UpstreamError:
            raise
        except Exception as exc:
            raise classify(exc) from exc

    async def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call(litellm.acompletion, request, text=False)

    def chat_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(litellm.acompletion, request, text=False)

    async def completion(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call(litellm.atext_completion, request, text=True)

    def completion_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self._stream(litellm.atext_completion, request, text=True)

    async def embedding(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call(litellm.aembedding, request, text=False, endpoint="embeddings")

async def warm_up() -> None:
    """litellm loads its provider modules on first use (~1 s); pay that at startup, offline."""
    await litellm.acompletion(model="openai/warm-up", messages=[{"role": "user", "content": "hi"}],
                              mock_response="ok", api_key="none")
