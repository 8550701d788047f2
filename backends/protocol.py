"""Request parsing for the worker: OpenAI bodies (validated by backends.wire.requests) plus the sampling
fields vLLM and transformers users send, resolved against the model's generation_config defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field

from backends.loading import LoadedModel
from backends.sampler import SamplingParams
from backends.wire.errors import bad_request
from backends.wire.requests import ChatRequest, CompletionRequest

DEFAULT_MAX_TOKENS = 256


class _SamplingExtras(BaseModel):
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    do_sample: bool | None = None
    return_tokens_as_token_ids: bool | None = None  # vLLM's flag: logprob tokens as "token_id:<id>"


class WorkerChatRequest(_SamplingExtras, ChatRequest):
    n: Annotated[int, Field(ge=1, le=16)] | None = None


class WorkerCompletionRequest(_SamplingExtras, CompletionRequest):
    n: Annotated[int, Field(ge=1, le=16)] | None = None


@dataclass
class Plan:
    """What to generate: one prompt's token ids, with everything resolved."""

    prompts: list[list[int]]
    params: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]
    top_logprobs: int | None
    seed: int | None
    n: int
    token_ids: bool = False


def _pick(body: dict[str, Any], defaults: dict[str, Any], key: str, neutral: Any) -> Any:
    value = body.get(key)
    if value is not None:
        return value
    return defaults.get(key, neutral)


def _logit_bias(body: dict[str, Any], lm: LoadedModel) -> tuple[tuple[int, float], ...]:
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    bias = []
    for token, value in (body.get("logit_bias") or {}).items():
        if not token.isdigit() or int(token) >= vocab:
            raise bad_request(f"logit_bias names {token!r}, which is not a token id of this model.", "logit_bias")
        bias.append((int(token), float(value)))
    return tuple(bias)


def sampling(body: dict[str, Any], lm: LoadedModel) -> SamplingParams:
    d = lm.defaults
    temperature = float(_pick(body, d, "temperature", 1.0))
    return SamplingParams(
        temperature=temperature,
        top_p=float(_pick(body, d, "top_p", 1.0)),
        top_k=int(_pick(body, d, "top_k", 0)),
        min_p=float(_pick(body, d, "min_p", 0.0)),
        presence_penalty=float(body.get("presence_penalty") or 0.0),
        frequency_penalty=float(body.get("frequency_penalty") or 0.0),
        repetition_penalty=float(_pick(body, d, "repetition_penalty", 1.0)),
        do_sample=bool(_pick(body, d, "do_sample", True)),
        logit_bias=_logit_bias(body, lm),
    )


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    return tuple(s for s in ((stop,) if isinstance(stop, str) else (stop or ())) if s)  # "" stops nothing


def _text(content: Any, index: int) -> str:
    if not isinstance(content, list):
        return content or ""
    parts = []  # content parts: the worker reads the text ones
    for j, part in enumerate(content):
        text = part.get("text", "") if isinstance(part, dict) else None
        if not isinstance(text, str):
            raise bad_request("A text content part must carry a string `text`.", f"messages.{index}.content.{j}.text")
        parts.append(text)
    return "".join(parts)


def chat_plan(body: dict[str, Any], lm: LoadedModel) -> Plan:
    messages = [{**m, "content": _text(m.get("content"), i)} for i, m in enumerate(body["messages"])]
    try:
        ids = lm.tokenizer.apply_chat_template(messages, tools=body.get("tools"), add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
        raise bad_request(f"The chat template rejected these messages: {exc}", "messages") from None
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise bad_request("top_logprobs requires logprobs: true.", "top_logprobs")
    top = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
    return _plan(body, lm, [list(ids)], top, body.get("max_completion_tokens") or body.get("max_tokens"))


def completion_plan(body: dict[str, Any], lm: LoadedModel) -> Plan:
    if body.get("echo"):
        raise bad_request("echo is not supported by this worker.", "echo")
    if body.get("suffix"):
        raise bad_request("suffix is not supported by this worker.", "suffix")
    if (body.get("best_of") or 1) > (body.get("n") or 1):
        raise bad_request("best_of is not supported by this worker.", "best_of")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [lm.tokenizer.encode(prompt)]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    elif all(isinstance(p, str) for p in prompt):
        prompts = [lm.tokenizer.encode(p) for p in prompt]
    else:
        prompts = [list(p) for p in prompt]
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    if any(not p for p in prompts) or any(t < 0 or t >= vocab for p in prompts for t in p):
        raise bad_request("The prompt is empty or holds token ids outside the vocabulary.", "prompt")
    return _plan(body, lm, prompts, body.get("logprobs"), body.get("max_tokens"), "prompt")


def _plan(body: dict[str, Any], lm: LoadedModel, prompts: list[list[int]], top_logprobs: int | None,
          max_tokens: int | None, prompt_param: str = "messages") -> Plan:
    longest = max(len(p) for p in prompts)
    if longest >= lm.context_length:
        raise bad_request(f"This model's maximum context length is {lm.context_length} tokens; the prompt has "
                          f"{longest}.", prompt_param, "context_length_exceeded")
    return Plan(prompts=prompts, params=sampling(body, lm), max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
                stop=_stops(body), top_logprobs=top_logprobs, seed=body.get("seed"), n=body.get("n") or 1,
                token_ids=bool(body.get("return_tokens_as_token_ids")))
