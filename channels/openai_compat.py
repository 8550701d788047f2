"""Channel type `openai`: any OpenAI-compatible server (OpenAI, vLLM, SGLang, ONE API, another relay)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.litellm_base import LiteLLMChannel


def api_base(base_url: str) -> str:
    """`https://host` and `https://host/v1` both mean the `/v1` API (ONE API's type 1 omits /v1,
    its type 50 includes it); any other path is taken as the full API root."""
    url = base_url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


class OpenAIChannel(LiteLLMChannel):
    """By default litellm's `hosted_vllm` route: its own aiohttp client speaking OpenAI's wire format,
    half the CPU of its `openai` route (which goes through the OpenAI SDK). That route drops `strict`
    and `additionalProperties` from tool schemas; `options.litellm_provider: "openai"` picks the SDK
    route for upstreams that honour strict tools (api.openai.com)."""

    type_name = "openai"

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
        kwargs["api_base"] = api_base(self.config.base_url or "https://api.openai.com")
        # The openai SDK refuses to start without a key; OpenAI-compatible servers often need none.
        kwargs["api_key"] = self.config.api_key or "none"
        return kwargs
