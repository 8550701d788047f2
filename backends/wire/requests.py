"""Validation of OpenAI request bodies. Unknown fields are kept (vLLM and the worker take top_k,
repetition_penalty, ...); known fields must lie in OpenAI's documented ranges. Structural limits (depth,
number of objects and arrays) hold before anything is built from a body."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backends.wire.errors import APIError, bad_request
from backends.wire.json_limits import load_json

Temperature = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


# strict: "stream": "yes" or "temperature": "0.5" are 400s, as at OpenAI, not values coerced here and then
# forwarded as the client spelled them.
STRICT = ConfigDict(extra="allow", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool | None = None


class _Base(BaseModel):
    model_config = STRICT
    refused: ClassVar[frozenset[str]] = frozenset()  # fields of another endpoint: a 400 naming them

    @classmethod
    def check(cls, body: dict[str, Any]) -> None:
        """Rules across fields, after each field is valid on its own; a 400 naming the field."""

    model: Annotated[str, Field(min_length=1, max_length=256)]


class _Common(_Base):
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    stop: Annotated[str, Field(max_length=1000)] | Annotated[list[Annotated[str, Field(max_length=1000)]],
                                                                Field(max_length=4)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None = None
    user: str | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # not OpenAI's, but vLLM's and the policies' own


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class NamedFunction(BaseModel):
    model_config = STRICT
    name: Annotated[str, Field(min_length=1, max_length=128)]


class ToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Common):
    messages: Annotated[list[Message], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class CompletionRequest(_Common):
    refused = frozenset({"messages", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                         "max_completion_tokens", "reasoning_effort", "top_logprobs", "modalities", "audio",
                         "prediction", "web_search_options", "verbosity"})

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    # 0 generates nothing: with `echo` (or vLLM's prompt_logprobs) that scores the prompt, as evaluation
    # harnesses do.
    max_tokens: Annotated[int, Field(ge=0)] | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must not be empty")
        return v

    @classmethod
    def check(cls, body: dict[str, Any]) -> None:
        if body.get("max_tokens") == 0 and not body.get("echo") and body.get("prompt_logprobs") is None:
            raise bad_request("max_tokens must be at least 1 (0 only scores the prompt, with echo).", "max_tokens",
                              "invalid_value")


RequestSchema = _Base  # what other API shapes' schemas build on (the gateway's Responses and Messages APIs)

# OpenAI's own bounds on /v1/embeddings: 2,048 inputs, none empty, 300,000 tokens in all.
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_TOKEN_IDS = 300_000
MAX_INPUT_TOKEN_IDS = 65_536
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1, max_length=MAX_INPUT_TOKEN_IDS)]


class EmbeddingRequest(_Base):
    input: (Annotated[str, Field(min_length=1)]
            | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
            | TokenIds
            | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)])
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1, le=65536)] | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        # Said before the union's members are tried: their first complaint ("should be a valid string") misleads.
        if not isinstance(v, list):
            return v
        if not v:
            raise ValueError("must not be empty")
        kinds = {type(x) for x in v}  # one pass over the items, never over every token id (C-speed min/max below)
        if kinds <= {int}:
            lists = [v]
        elif kinds == {str} or kinds == {list}:
            if len(v) > MAX_EMBEDDING_INPUTS:
                raise ValueError(f"at most {MAX_EMBEDDING_INPUTS:,} inputs per request")
            lists = v if kinds == {list} else []
            empty = next((i for i, x in enumerate(v) if not x), None)
            if empty is not None:
                raise ValueError(f"input {empty} is empty")
        else:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")
        if lists and max(map(len, lists)) > MAX_INPUT_TOKEN_IDS:
            raise ValueError(f"at most {MAX_INPUT_TOKEN_IDS:,} token ids per input")
        if sum(map(len, lists)) > MAX_EMBEDDING_TOKEN_IDS:
            raise ValueError(f"at most {MAX_EMBEDDING_TOKEN_IDS:,} token ids per request")
        for ids in lists:
            try:
                ok = min(ids) >= 0 and max(ids) < 2**31
            except TypeError:  # a string among the ids
                ok = False
            if not ok:
                raise ValueError("token ids must be integers from 0 to 2^31 - 1")
        return v

    @classmethod
    def check(cls, body: dict[str, Any]) -> None:
        if body.get("stream"):
            raise bad_request("/v1/embeddings does not stream.", "stream", "unsupported_parameter")


def embedding_inputs(body: dict[str, Any]) -> list[str] | list[list[int]]:
    """A validated request's `input` as a list of texts or a list of token-id lists."""
    value = body["input"]
    if isinstance(value, str):
        return [value]
    if isinstance(value[0], int):
        return [value]
    return value


def parse_body(raw: bytes, schema: type[_Base]) -> dict[str, Any]:
    """Parse and validate; returns the client's own dict (not a re-serialised model) so nothing the
    client sent is renamed or re-typed on the way upstream."""
    body = load_json(raw)
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    for name in sorted(schema.refused & body.keys()):
        raise bad_request(f"Unrecognized request argument supplied: {name} (it belongs to /v1/chat/completions).",
                          name, "unsupported_parameter")
    check_body(body, schema)
    if "stream_options" in body and not body.get("stream"):
        # OpenAI refuses stream_options without stream; drop it instead, since gateways in front of us
        # (new-api forces include_usage) may add it to every request.
        del body["stream_options"]
    return body


def check_body(body: dict[str, Any], schema: type[_Base], context: str | None = None) -> dict[str, Any]:
    """The body held to the schema's rules; a 400 naming the first field at fault (`context` says in which form
    the client's body was checked, when it is not the one it sent)."""
    try:
        schema.model_validate(body)
        schema.check(body)
    except ValidationError as exc:
        error = _validation_error(exc)
    except APIError as exc:
        error = exc
    else:
        return body
    if context:
        error.message = f"{error.message.rstrip('.')} ({context})."
    raise error


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    loc = first.get("loc", ())
    # Unions put the member type into loc ("str", "list[str]"); a client names only its own fields.
    path = [str(p) for p in loc if isinstance(p, int) or p.isidentifier() and p not in ("str", "list")]
    param = ".".join(path) or None
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    value = first.get("input")
    shown = orjson.dumps(value).decode()[:80] if not isinstance(value, dict | list) else type(value).__name__
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return bad_request(f"Invalid value for '{param}': {reason} (got {shown}).", param,
                       "invalid_value")
