"""Validation of OpenAI request bodies. Unknown fields pass through untouched (upstreams such as vLLM
take top_k, repetition_penalty, ...); known fields must lie in OpenAI's documented ranges."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from relay.errors import RelayError, bad_request
from relay.json_check import broken_pattern

MAX_DEPTH = 64  # JSON nesting; deeper is a 400 (nothing an OpenAI client sends comes close)

Temperature = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


# strict: "stream": "yes" or "temperature": "0.5" are 400s, as at OpenAI, not values coerced here and then
# forwarded as the client spelled them.
STRICT = ConfigDict(extra="allow", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None


class _Common(BaseModel):
    model_config = STRICT
    refused: ClassVar[frozenset[str]] = frozenset()  # fields of another endpoint: a 400 naming them

    model: Annotated[str, Field(min_length=1, max_length=256)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # not OpenAI's, but vLLM's and the policies' own


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class CompletionRequest(_Common):
    refused = frozenset({"messages", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                         "max_completion_tokens", "reasoning_effort", "top_logprobs", "modalities", "audio",
                         "prediction", "web_search_options"})

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v


def parse_body(raw: bytes, schema: type[_Common]) -> dict[str, Any]:
    """Parse and validate; returns the client's own dict (not a re-serialised model) so nothing the
    client sent is renamed or re-typed on the way upstream."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("We could not parse the JSON body of your request. (HINT: This likely means "
                          "you aren't using your HTTP library correctly.)") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    too_deep = _deeper_than(body, MAX_DEPTH)
    if too_deep is not None:
        raise bad_request(f"The request nests JSON more than {MAX_DEPTH} levels deep (at '{too_deep}').", too_deep,
                          "invalid_value")
    for name in sorted(schema.refused & body.keys()):
        raise bad_request(f"Unrecognized request argument supplied: {name} (it belongs to /v1/chat/completions).",
                          name, "unsupported_parameter")
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_json_schema(body)
    if "stream_options" in body and not body.get("stream"):
        # OpenAI refuses stream_options without stream; drop it instead, since gateways in front of us
        # (new-api forces include_usage) may add it to every request.
        del body["stream_options"]
    return body


def _deeper_than(value: Any, limit: int) -> str | None:
    """The path of the first value nested deeper than `limit`, or None; iterative, so depth costs no stack."""
    stack: list[tuple[Any, int, tuple]] = [(value, 0, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > limit:
            return ".".join(str(p) for p in path[:8]) + (".…" if len(path) > 8 else "")
        if isinstance(node, dict):
            stack.extend((v, depth + 1, path + (k,)) for k, v in node.items() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1, path + (i,)) for i, v in enumerate(node) if isinstance(v, dict | list))
    return None


def _check_json_schema(body: dict[str, Any]) -> None:
    """A json_schema whose patterns are not regular expressions is refused here, as OpenAI refuses it."""
    fmt = body.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is None:
        return
    broken = broken_pattern(schema)
    if broken is not None:
        where, problem = broken
        param = "response_format.json_schema.schema" + (f".{where}" if where else "")
        raise bad_request(f"Invalid schema for response_format: {problem}.", param, "invalid_value")


def _validation_error(exc: ValidationError) -> RelayError:
    first = exc.errors(include_url=False)[0]
    loc = first.get("loc", ())
    # Unions put the member type into loc ("str", "list[str]"); a client names only its own fields.
    path = [str(p) for p in loc if isinstance(p, int) or p.isidentifier() and p not in ("str", "list")]
    param = ".".join(path) or None
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    value = first.get("input")
    shown = orjson.dumps(value).decode()[:80] if not isinstance(value, dict | list) else type(value).__name__
    return bad_request(f"Invalid value for '{param}': {first.get('msg', 'invalid')} (got {shown}).", param,
                       "invalid_value")
