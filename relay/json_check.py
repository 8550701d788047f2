"""Checking a JSON answer against the client's own `json_schema` without letting the client hold the process:
every `pattern` / `patternProperties` is matched by RE2 (linear time, bounded memory) instead of Python's
backtracking `re`; a schema may carry at most MAX_PATTERNS patterns of MAX_PATTERN_CHARS each; and the check
runs in its own thread under a time budget — a check that overruns it (an exponential `anyOf` tree, a
quadratic `uniqueItems`) is stopped inside the thread, and at most CHECKS_AT_ONCE run at a time (beyond that an
answer is judged by parsing alone).

A pattern RE2 cannot take (backreferences, lookaround) cannot be checked: the answer is then judged by
parsing alone. A pattern that is not a regular expression at all is refused with the request (400)."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import itertools
import json
import re
import threading
from typing import Any

import jsonschema
import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import re2
from referencing import Registry

from backends.wire.errors import bad_request

CHECK_BUDGET_S = 2.0  # an answer not judged by then is returned as it is
CHECKS_AT_ONCE = 2  # concurrent checks per process (each may take a core for CHECK_BUDGET_S)
MAX_PATTERNS = 100  # per schema; more is a 400
MAX_PATTERN_CHARS = 1000
MAX_CHECKED_CHARS = 256 * 1024  # a longer answer is judged by parsing alone
INLINE_PARSE_CHARS = 32 * 1024  # without a schema, answers up to this are parsed on the event loop (~0.1 ms)
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 1 << 20  # per compiled pattern; a larger one is "cannot be checked"
_RE2_OPTIONS.log_errors = False
_SCHEMA_DATA = frozenset({"default", "const", "enum", "examples", "example"})  # values, not subschemas


class Unverifiable(Exception):
    """The schema uses a pattern the safe engine cannot run."""


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> Any:
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error:
        return None


class _SafeRe:
    """What jsonschema's keywords call as `re`: only `search`, and only through RE2."""

    error = re.error

    @staticmethod
    def search(pattern: str, string: str) -> Any:
        compiled = _compiled(pattern)
        if compiled is None:
            raise Unverifiable(pattern)
        return compiled.search(string)


# jsonschema evaluates pattern, patternProperties and additionalProperties (and their legacy forms) with the
# module-level `re`; pinned, and checked here so an upgrade that moves them fails loudly at import.
for _module in (jsonschema._keywords, jsonschema._utils, jsonschema._legacy_keywords):
    assert getattr(_module, "re", None) is re, f"{_module.__name__} no longer uses re; revisit relay.json_check"
    _module.re = _SafeRe  # type: ignore[attr-defined]


def response_schema(body: dict[str, Any]) -> Any:
    """The json_schema a chat request asks its answer to follow, if any."""
    fmt = body.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
    return spec.get("schema") if isinstance(spec, dict) else None


def check_response_schema(body: dict[str, Any]) -> None:
    """A json_schema with too many patterns, or one that is no regular expression, is refused, as OpenAI refuses
    an invalid schema. It compiles patterns: run it off the event loop."""
    problem = schema_problem(response_schema(body))
    if problem is not None:
        where, message = problem
        param = "response_format.json_schema.schema" + (f".{where}" if where else "")
        raise bad_request(f"Invalid schema for response_format: {message}.", param, "invalid_value")


def schema_problem(schema: Any) -> tuple[str, str] | None:
    """(path, message) of what makes a request's schema unacceptable: too many or too long patterns, or a
    pattern that is no regular expression at all. CPU-bound (it compiles them): callers run it in a thread."""
    patterns: list[tuple[str, str]] = []
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                patterns.append((node["pattern"], f"{path}.pattern"))
            if isinstance(node.get("patternProperties"), dict):
                patterns += [(str(p), f"{path}.patternProperties") for p in node["patternProperties"]]
            if len(patterns) > MAX_PATTERNS:
                return path.lstrip("."), f"the schema has more than {MAX_PATTERNS} patterns"
            stack.extend((v, f"{path}.{k}") for k, v in node.items()
                         if isinstance(v, dict | list) and k not in _SCHEMA_DATA)
        elif isinstance(node, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(node) if isinstance(v, dict | list))
    for pattern, where in patterns:
        problem = (f"a pattern is longer than {MAX_PATTERN_CHARS} characters" if len(pattern) > MAX_PATTERN_CHARS
                   else _pattern_problem(pattern))
        if problem:
            return where.lstrip("."), problem
    return None


def _pattern_problem(pattern: str) -> str | None:
    if _compiled(pattern) is not None:
        return None
    try:
        re.compile(pattern)  # valid, but beyond RE2: accepted, not checked
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"{pattern[:60]!r} is not a valid regular expression ({exc})"
    return None


def answer_ok(response: dict[str, Any], request: dict[str, Any]) -> bool:
    """The first choice's content parses as JSON (and matches the json_schema, when one was given)."""
    content = _content(response)
    return content is not None and content_ok(content, response_schema(request))


def content_ok(content: str, schema: Any) -> bool:
    """The text parses as JSON and, when `schema` is one, follows it."""
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        return False
    if not isinstance(schema, dict):
        return True
    try:
        # An empty registry: a client's schema can never make the relay fetch a URL ($ref to http://...).
        validator = jsonschema.validators.validator_for(schema)(schema, registry=Registry())
        validator.check_schema(schema)
        errors = list(itertools.islice(validator.iter_errors(data), 1))
    except Exception:  # Unverifiable, an unusable schema (bad $ref, invalid), runaway recursion: parse only
        return True
    return not errors


class _Stopped(BaseException):
    """Raised inside a check's thread when its time is up (BaseException: no `except Exception` swallows it)."""


_running = 0  # checks in flight in this process (only the event loop's thread changes it)


async def answer_verdict(response: dict[str, Any], request: dict[str, Any]) -> bool | None:
    """Whether the answer is good JSON for this request; None when it could not be judged (in time, or because
    CHECKS_AT_ONCE are running) — callers that must decide count that as good."""
    content = _content(response)
    if content is None:
        return False
    return await judge_in_time(content, response_schema(request))


async def judge_in_time(content: str, schema: Any, budget_s: float = CHECK_BUDGET_S) -> bool | None:
    """content_ok in a thread of its own, stopped when it overruns `budget_s` (or its caller is cancelled);
    None when it could not be judged: out of time, or CHECKS_AT_ONCE running and the text parses."""
    global _running
    if len(content) > MAX_CHECKED_CHARS:
        return await asyncio.to_thread(_parses, content)
    if not isinstance(schema, dict) and len(content) <= INLINE_PARSE_CHARS:
        return _parses(content)  # parsing alone, and short: cheaper than a thread
    if _running >= CHECKS_AT_ONCE:
        return None if _parses(content) else False
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool | None] = loop.create_future()

    def work() -> None:
        result: bool | None
        try:
            result = content_ok(content, schema)
        except _Stopped:
            result = None
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

    thread = threading.Thread(target=work, name="json-check", daemon=True)
    _running += 1
    thread.start()
    try:
        return await asyncio.wait_for(asyncio.shield(done), budget_s)
    except (TimeoutError, asyncio.CancelledError) as exc:
        if thread.is_alive():
            # Python cannot kill a thread, but it can raise in one: the check stops at its next bytecode.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Stopped))
        if isinstance(exc, asyncio.CancelledError):
            raise
        return None
    finally:
        _running -= 1


def _content(response: dict[str, Any]) -> str | None:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _parses(content: str) -> bool:
    try:
        json.loads(content)
    except (ValueError, RecursionError):
        return False
    return True
