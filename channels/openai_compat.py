"""Channel type `openai`: any OpenAI-compatible server (OpenAI, vLLM, SGLang, ONE API, another relay)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from channels.litellm_base import LiteLLMChannel
from channels.openai_http import OpenAIClient

DIRECT_OPTIONS = frozenset({"extra_headers"})  # what the direct client understands; anything else: litellm


def api_base(base_url: str) -> str:
    """`https://host` and `https://host/v1` both mean the `/v1` API (ONE API's type 1 omits /v1,
    its type 50 includes it); any other path is taken as the full API root."""
    url = base_url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


class OpenAIChannel(LiteLLMChannel):
    """Requests go straight to the upstream with the direct OpenAI client (channels.openai_http): one hop less
    than litellm and nothing lost in translation. A channel whose `options` name litellm settings (other than
    `extra_headers`), or `litellm_provider` (e.g. "openai" for the OpenAI SDK route, "hosted_vllm"), is sent
    through litellm instead."""

    type_name = "openai"

    def __init__(self, config) -> None:
        super().__init__(config)
        options = self.config.options
        self.direct = set(options) <= DIRECT_OPTIONS
        limit = self.config.max_inflight
        self.client = OpenAIClient(self.api_root, self.config.api_key, self.config.timeout_s,
                                   headers=options.get("extra_headers") or {},
                                   pool=(self.config.name, limit) if limit else None) if self.direct else None

    @property
    def api_root(self) -> str:
        return api_base(self.config.base_url or "https://api.openai.com")

    # --- the direct route ---------------------------------------------------------------------------------

    async def chat(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.client is None:
            return await super().chat(request)
        return await self.client.post("/chat/completions", _without_relay_fields(request))

    def chat_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self.client is None:
            return super().chat_stream(request)
        return self.client.stream("/chat/completions", _without_relay_fields(request))

    def chat_stream_batches(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        if self.client is None:
            return super().chat_stream_batches(request)
        return self.client.stream_batches("/chat/completions", _without_relay_fields(request))

    def completion_stream_batches(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        if self.client is None:
            return super().completion_stream_batches(request)
        return self.client.stream_batches("/completions", _without_relay_fields(request))

    async def completion(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.client is None:
            return await super().completion(request)
        return await self.client.post("/completions", _without_relay_fields(request))

    def completion_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self.client is None:
            return super().completion_stream(request)
        return self.client.stream("/completions", _without_relay_fields(request))

    async def embedding(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.client is None:
            return await super().embedding(request)
        return await self.client.post("/embeddings", _without_relay_fields(request))

    # --- the litellm route ----------------------------------------------------------------------------------

    @property
    def provider(self) -> str:
        return self.config.options.get("litellm_provider", "hosted_vllm")

    def litellm_model(self, upstream_model: str) -> str:
        return f"{self.provider}/{upstream_model}"

    def text_model(self, upstream_model: str) -> str:
        if self.provider == "openai":
            return f"text-completion-openai/{upstream_model}"
        return self.litellm_model(upstream_model)

    def connection_kwargs(self) -> dict[str, Any]:
        kwargs = {k: v for k, v in self.config.options.items() if k != "litellm_provider"}
        kwargs["api_base"] = self.api_root
        # The openai SDK refuses to start without a key; OpenAI-compatible servers often need none.
        kwargs["api_key"] = self.config.api_key or "none"
        return kwargs


def _without_relay_fields(request: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k != "metadata"}  # relay hints (metadata.task) stay here
