"""Channel type `local`: a backends/ worker (`policy-relay worker`), which speaks OpenAI's protocol: it goes
through the direct OpenAI client like any `openai` channel. Its seeded sampling is reproducible (a
per-request torch.Generator), which the cache relies on, and it decodes JSON under a grammar, so the policies'
JSON retry has nothing to retry."""

from __future__ import annotations

from channels.base import ChannelCapabilities
from channels.openai_compat import OpenAIChannel, api_base

DEFAULT_WORKER_URL = "http://127.0.0.1:8001"


class LocalChannel(OpenAIChannel):
    type_name = "local"
    default_capabilities = ChannelCapabilities(seeded_determinism=True, constrained_decoding=True)

    @property
    def api_root(self) -> str:
        return api_base(self.config.base_url or DEFAULT_WORKER_URL)
