"""Channel type `local`: a backends/ worker (`policy-relay worker`), which speaks OpenAI's protocol.
Its seeded sampling is reproducible (a per-request torch.Generator), which the cache relies on."""

from __future__ import annotations

import httpx

from channels.openai_compat import OpenAIChannel, api_base

DEFAULT_WORKER_URL = "http://127.0.0.1:8001"


class LocalChannel(OpenAIChannel):
    type_name = "local"
    seeded_determinism = True

    @property
    def base(self) -> str:
        return api_base(self.config.base_url or DEFAULT_WORKER_URL)

    def connection_kwargs(self) -> dict:
        return {**super().connection_kwargs(), "api_base": self.base}

    async def health(self) -> bool:
        root = self.base.removesuffix("/v1")
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(root + "/health")).status_code == 200
        except httpx.HTTPError:
            return False
