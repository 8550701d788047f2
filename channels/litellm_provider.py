"""Channel type `litellm`: any provider litellm supports, named by a litellm model string in
`options.model` (or by the mapped model name), e.g. `anthropic/claude-3-5-haiku-latest`."""

from channels.litellm_base import LiteLLMChannel

__all__ = ["LiteLLMChannel"]
