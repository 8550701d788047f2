"""Which request fields reach a channel's upstream.

OpenAI's core generation fields always do (a policy's `drop` can still remove them). Any other field — those
that bill the operator (`service_tier`), keep the tenant's data at the operator's provider (`store`), or
identify users (`user`, `safety_identifier`, `prompt_cache_key`), and any field nobody declared — reaches it
only when the channel's `passthrough` list names it (`["*"]`: everything). Without a list, a channel takes
the sampling extras of vLLM and the local worker. Every dropped field is a rewrite with rule `passthrough`."""

from __future__ import annotations

from typing import Any

CORE_FIELDS = {
    "chat": frozenset({
        "model", "messages", "temperature", "top_p", "n", "stream", "stream_options", "stop", "max_tokens",
        "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
        "top_logprobs", "response_format", "seed", "tools", "tool_choice", "parallel_tool_calls", "functions",
        "function_call", "reasoning_effort"}),
    "completions": frozenset({
        "model", "prompt", "temperature", "top_p", "n", "stream", "stream_options", "stop", "max_tokens",
        "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "seed", "echo", "suffix",
        "best_of"}),
}
# Sampling and decoding extras (vLLM's and the local worker's): they shape this one answer, bill nothing
# extra and carry no one's data.
DEFAULT_EXTRAS = frozenset({
    "top_k", "min_p", "repetition_penalty", "do_sample", "length_penalty", "min_tokens", "ignore_eos",
    "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "bad_words", "allowed_token_ids", "guided_json", "guided_regex",
    "guided_choice", "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern",
    "structured_outputs", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
    "add_special_tokens", "echo", "return_tokens_as_token_ids", "prompt_logprobs", "documents"})
RELAY_ONLY = frozenset({"metadata"})  # hints for the relay itself (metadata.task); never forwarded


def upstream_fields(endpoint: str, request: dict[str, Any],
                    allowed: frozenset[str] | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request as this channel may receive it, and a rewrite record per field taken out."""
    core = CORE_FIELDS.get(endpoint, CORE_FIELDS["chat"])
    extras = DEFAULT_EXTRAS if allowed is None else allowed
    everything = "*" in extras
    kept: dict[str, Any] = {}
    dropped: list[dict[str, Any]] = []
    for name, value in request.items():
        if name in RELAY_ONLY:
            continue
        if name in core or everything or name in extras:
            kept[name] = value
        else:
            dropped.append({"param": name, "from": value, "to": None, "rule": "passthrough"})
    return kept, dropped
