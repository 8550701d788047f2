"""The channel interface. A channel type is a class registered under the `policy_relay.channels`
entry-point group; it is built once per configured channel and must be cheap to call."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class ChannelCapabilities(BaseModel):
    """What a channel's upstream can be relied on for. A channel type declares its defaults; an operator may
    override them per channel (`capabilities` in the admin API: unknown names are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seeded_determinism: bool = False  # the same request with the same seed gives the same answer: cacheable
    stream_usage: bool = True  # honours stream_options.include_usage, so streamed usage is exact
    constrained_decoding: bool = False  # enforces response_format JSON while decoding: no JSON retry needed


@dataclass(frozen=True)
class ChannelConfig:
    """What an adaptor knows about its channel (a detached copy of the database row)."""

    id: int
    name: str
    type: str
    base_url: str | None
    api_key: str | None
    models: tuple[str, ...]
    model_mapping: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    weight: int = 1
    timeout_s: float = 60.0
    retries: int = 0  # extra tries on the same channel after a transient failure, before failing over
    max_inflight: int | None = None  # requests sent to it at once (over all gateway processes); None: no limit
    options: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)  # the operator's overrides of the type's defaults
    passthrough: frozenset[str] | None = None  # non-core request fields allowed upstream; None: the default

    def upstream_model(self, model: str) -> str:
        return self.model_mapping.get(model, model)


# The id of the request being served (the gateway sets it per request): channels send it upstream as
# X-Request-Id, so one id follows a request through every hop's logs.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def request_id_header() -> dict[str, str]:
    rid = REQUEST_ID.get()
    return {"X-Request-Id": rid} if rid else {}


# OpenAI's core generation fields of each endpoint: what every channel receives (relay.passthrough) and what a
# litellm channel hands litellm as arguments.
OPENAI_FIELDS = {
    "chat": frozenset({
        "model", "messages", "temperature", "top_p", "n", "stream", "stream_options", "stop", "max_tokens",
        "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
        "top_logprobs", "response_format", "seed", "tools", "tool_choice", "parallel_tool_calls", "functions",
        "function_call", "reasoning_effort"}),
    "completions": frozenset({
        "model", "prompt", "temperature", "top_p", "n", "stream", "stream_options", "stop", "max_tokens",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "echo", "suffix",
        "best_of"}),
    "embeddings": frozenset({"model", "input", "encoding_format", "dimensions"}),
}

# ONE API / new-api disable a channel whose error carries these; a provider's words must not pass them on.
ONE_API_DISABLE_WORDS = ("credit", "balance", "permission denied", "insufficient_quota", "authentication_error",
                         "permission_error", "quota")


class UpstreamError(Exception):
    """A failure talking to the channel, already classified for routing and for the client."""

    def __init__(self, status: int, message: str, *, retryable: bool, kind: str = "upstream_error",
                 param: str | None = None, type: str | None = None, code: str | None = None,
                 upstream_message: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable  # connect errors, timeouts, 429 and 5xx; never 4xx client errors
        self.kind = kind
        # An upstream 4xx's own error fields, passed on to the client as the upstream gave them.
        self.param, self.type, self.code = param, type, code
        # What the upstream itself said, for operators (logs, the parameter probe); never sent to a client.
        self.upstream_message = upstream_message
        self.retry_after_s = retry_after_s  # a busy upstream's Retry-After, passed on when no channel is left


class Channel(ABC):
    """Requests arrive already rewritten by the policy, with `model` set to the upstream name.
    Responses are plain dicts in OpenAI's shape; streams yield OpenAI chunk dicts (or lists of them, from
    the *_stream_batches methods)."""

    type_name: ClassVar[str]
    default_capabilities: ClassVar[ChannelCapabilities] = ChannelCapabilities()

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config
        self.capabilities = self.effective_capabilities(config.capabilities)

    @classmethod
    def effective_capabilities(cls, overrides: dict[str, Any]) -> ChannelCapabilities:
        """The type's defaults with an operator's overrides (names the schema does not know are ignored)."""
        known = {k: v for k, v in overrides.items() if k in ChannelCapabilities.model_fields}
        return ChannelCapabilities.model_validate({**cls.default_capabilities.model_dump(), **known})

    @abstractmethod
    async def chat(self, request: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def chat_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    @abstractmethod
    async def completion(self, request: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def completion_stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]: ...

    async def embedding(self, request: dict[str, Any]) -> dict[str, Any]:
        """/v1/embeddings; a channel type that has none refuses (the request's error: no failover counted)."""
        raise UpstreamError(400, f"Channels of type `{self.type_name}` do not serve /v1/embeddings.",
                            retryable=False, kind="invalid_request_error", code="unsupported_endpoint")

    # What the pipeline reads: chunks in lists of those that arrived together, relayed with one write each. A
    # channel that reads bytes off the wire overrides these; by default every chunk is its own list.
    def chat_stream_batches(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        return _one_by_one(self.chat_stream(request))

    def completion_stream_batches(self, request: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        return _one_by_one(self.completion_stream(request))


async def _one_by_one(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[list[dict[str, Any]]]:
    try:
        async for chunk in chunks:
            yield [chunk]
    finally:
        await chunks.aclose()  # closing the batches closes the channel's stream (and its connection)
