"""Request parsing for the worker: OpenAI bodies (validated by backends.wire.requests) plus what vLLM and
transformers users send — sampling extras, structured-output constraints, prompt scoring — resolved into a
Plan against the model's generation_config defaults and chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from backends import tools
from backends.grammar import Constraint
from backends.loading import LoadedModel
from backends.sampler import SamplingParams
from backends.wire.errors import bad_request
from backends.wire.requests import ChatRequest, CompletionRequest

DEFAULT_MAX_TOKENS = 256
MAX_SEQUENCES = 64  # prompts × n in one request
Text = Annotated[str, Field(max_length=65_536)]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (and, one field each, its older `guided_*` extras)."""

    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    regex: Annotated[str, Field(max_length=4096)] | None = None
    choice: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(min_length=1, max_length=256)] | None = None
    grammar: Text | None = None
    json_object: bool | None = None


class _WorkerExtras(BaseModel):
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    do_sample: bool | None = None
    return_tokens_as_token_ids: bool | None = None  # vLLM's flag: logprob tokens as "token_id:<id>"
    prompt_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # vLLM's: logprobs of the prompt's tokens
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Annotated[str, Field(max_length=4096)] | None = None
    guided_choice: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(min_length=1,
                                                                                 max_length=256)] | None = None
    guided_grammar: Text | None = None


class WorkerChatRequest(_WorkerExtras, ChatRequest):
    n: Annotated[int, Field(ge=1, le=16)] | None = None


class WorkerCompletionRequest(_WorkerExtras, CompletionRequest):
    n: Annotated[int, Field(ge=1, le=16)] | None = None


@dataclass
class Plan:
    """What to generate: prompts' token ids and everything else resolved."""

    prompts: list[list[int]]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    top_logprobs: int | None
    seed: int | None
    n: int
    token_ids: bool = False
    constraint: Constraint | None = None
    tool_calls: bool = False  # parse the answer for <tool_call> blocks
    prompt_logprobs: int | None = None  # score the prompt, with this many alternatives per token
    echo: bool = False  # completions: the prompt comes back in front of the answer


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


def constraint(body: dict[str, Any]) -> Constraint | None:
    """The one constraint a request asks for (response_format, structured_outputs or a guided_* field)."""
    found: list[tuple[str, Constraint]] = []
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        found.append(("response_format", Constraint("json_object", param="response_format")))
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object.",
                              "response_format.json_schema.schema")
        found.append(("response_format", Constraint("json_schema", schema, "response_format.json_schema.schema")))
    sources = {f"guided_{k}": body.get(f"guided_{k}") for k in ("json", "regex", "choice", "grammar")}
    so = body.get("structured_outputs") or {}
    sources.update({f"structured_outputs.{k}": so.get(k) for k in ("json", "regex", "choice", "grammar")})
    if so.get("json_object"):
        found.append(("structured_outputs.json_object", Constraint("json_object", param="structured_outputs")))
    for name, value in sources.items():
        if value is None:
            continue
        kind = name.rsplit("_", 1)[-1] if name.startswith("guided_") else name.split(".")[1]
        if kind == "json":
            value = _schema(value, name)
            kind = "json_schema"
        found.append((name, Constraint(kind, value, name)))
    if len(found) > 1:
        raise bad_request(f"Give one constraint, not {' and '.join(n for n, _ in found)}.", found[1][0])
    return found[0][1] if found else None


def _schema(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise bad_request("The JSON schema is not JSON.", param) from None
    if not isinstance(value, dict):
        raise bad_request("The JSON schema must be an object.", param)
    return value


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


def _render(lm: LoadedModel, messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None) -> list[int]:
    try:
        ids = lm.tokenizer.apply_chat_template(messages, tools=functions, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
        raise bad_request(f"The chat template rejected these messages: {exc}", "messages") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def chat_plan(body: dict[str, Any], lm: LoadedModel) -> Plan:
    messages = tools.for_template([{**m, "content": _text(m.get("content"), i)}
                                   for i, m in enumerate(body["messages"])])
    choice = body.get("tool_choice") or "auto"
    offered = body.get("tools") if choice != "none" else None
    functions = [t.get("function") for t in offered or []]
    if any(not isinstance(f, dict) or not isinstance(f.get("name"), str) for f in functions):
        raise bad_request("Each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}.", "tools")
    ids = _render(lm, messages, offered or None)
    if offered and ids == _render(lm, messages, None):
        raise bad_request(f"The chat template of {lm.name} cannot render tools; this model cannot call them "
                          "(send tool_choice: \"none\" to answer without them).", "tools")
    forced = _forced_call(choice, functions)
    found = constraint(body)
    if forced is not None and found is not None:
        raise bad_request("A forced tool call and a response format cannot be combined.", "tool_choice")
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise bad_request("top_logprobs requires logprobs: true.", "top_logprobs")
    top = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
    plan = _plan(body, lm, [ids], top, body.get("max_completion_tokens") or body.get("max_tokens"))
    plan.constraint, plan.tool_calls = forced or found, bool(offered)
    return plan


def _forced_call(choice: Any, functions: list[dict[str, Any]]) -> Constraint | None:
    if choice == "required":
        if not functions:
            raise bad_request("tool_choice \"required\" needs tools.", "tool_choice")
        return Constraint("tool_call", functions, "tool_choice")
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        named = [f for f in functions if f["name"] == name]
        if not named:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools.", "tool_choice")
        return Constraint("tool_call", named, "tool_choice")
    return None


def completion_plan(body: dict[str, Any], lm: LoadedModel) -> Plan:
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
    if any(not p for p in prompts) or any(not isinstance(t, int) or t < 0 or t >= vocab for p in prompts for t in p):
        raise bad_request("The prompt is empty or holds token ids outside the vocabulary.", "prompt")
    plan = _plan(body, lm, prompts, body.get("logprobs"), body.get("max_tokens"), "prompt")
    plan.constraint = constraint(body)
    plan.echo = bool(body.get("echo"))
    if plan.echo and body.get("logprobs") is not None and plan.prompt_logprobs is None:
        plan.prompt_logprobs = body["logprobs"]  # the echoed prompt carries its logprobs too
    return plan


def _plan(body: dict[str, Any], lm: LoadedModel, prompts: list[list[int]], top_logprobs: int | None,
          max_tokens: int | None, prompt_param: Literal["messages", "prompt"] = "messages") -> Plan:
    n = body.get("n") or 1
    if len(prompts) * n > MAX_SEQUENCES:
        raise bad_request(f"This asks for {len(prompts) * n} sequences (prompts × n); at most {MAX_SEQUENCES}.",
                          "n")
    longest = max(len(p) for p in prompts)
    if longest >= lm.context_length:
        raise bad_request(f"This model's maximum context length is {lm.context_length} tokens; the prompt has "
                          f"{longest}.", prompt_param, "context_length_exceeded")
    return Plan(prompts=prompts, params=sampling(body, lm),
                max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens, stop=_stops(body),
                top_logprobs=top_logprobs, seed=body.get("seed"), n=n,
                token_ids=bool(body.get("return_tokens_as_token_ids")), prompt_logprobs=body.get("prompt_logprobs"))
