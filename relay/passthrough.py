"""Which request fields reach a channel's upstream.

OpenAI's core generation fields always do (a policy's `drop` can still remove them). Any other field — those
that bill the operator (`service_tier`), keep the tenant's data at the operator's provider (`store`), or
identify users (`user`, `safety_identifier`, `prompt_cache_key`), and any field nobody declared — reaches it
only when the channel's `passthrough` list names it (`["*"]`: everything). Every channel takes the sampling
extras of vLLM and the local worker, and every field the policy itself set (greedy as `top_k: 1` must reach
the upstream). Every dropped field is a rewrite with rule `passthrough`; its value is not recorded (a `user`
the relay keeps from the upstream should not sit in the request log either), only its JSON type."""

from __future__ import annotations

from typing import Any

from channels.base import OPENAI_FIELDS, Channel
from relay.policy import PolicyOutcome

# Sampling and decoding extras (vLLM's and the local worker's): they shape this one answer, bill nothing
# extra and carry no one's data.
DEFAULT_EXTRAS = frozenset({
    "top_k", "min_p", "repetition_penalty", "do_sample", "length_penalty", "min_tokens", "ignore_eos",
    "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "bad_words", "allowed_token_ids", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern",
    "structured_outputs", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "echo", "return_tokens_as_token_ids", "prompt_logprobs", "documents",
    "response_format"})  # on /v1/completions: vLLM's structured outputs
RELAY_ONLY = frozenset({"metadata"})  # hints for the relay itself (metadata.task); never forwarded


def upstream_fields(endpoint: str, request: dict[str, Any], allowed: frozenset[str] | None,
                    policy_set: frozenset[str] = frozenset()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request as this channel may receive it, and a rewrite record per field taken out."""
    core = OPENAI_FIELDS[endpoint]
    extras = DEFAULT_EXTRAS | (allowed or frozenset()) | policy_set
    everything = "*" in extras
    kept: dict[str, Any] = {}
    dropped: list[dict[str, Any]] = []
    for name, value in request.items():
        if name in RELAY_ONLY:
            continue
        if name in core or everything or name in extras:
            kept[name] = value
        else:
            dropped.append({"param": name[:100], "from": _kind(value), "to": None, "rule": "passthrough"})
    return kept, dropped


def _kind(value: Any) -> Any:
    """What the log and the header show of a dropped value: booleans and numbers as they were, else a type."""
    if isinstance(value, bool | int | float):
        return value
    return {str: "<string>", dict: "<object>", list: "<array>"}.get(type(value), "<null>")


def upstream_request(endpoint: str, outcome: PolicyOutcome, channel: Channel) -> tuple[dict[str, Any], list]:
    """What one channel is sent for this request, and the fields it may not receive (as rewrites)."""
    config = channel.config
    policy_set = frozenset(r["param"] for r in outcome.rewrites if r["to"] is not None)
    request, dropped = upstream_fields(endpoint, outcome.request, config.passthrough, policy_set)
    request["model"] = config.upstream_model(request["model"])
    if endpoint == "embeddings":
        request["encoding_format"] = "float"  # the client's encoding is made by the relay, for misses and hits alike
    if request.get("stream") and channel.capabilities.stream_usage:
        # Always ask for usage so the log and quota are exact; the client sees it only if it asked.
        request["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
    return request, dropped
