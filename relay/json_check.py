"""Checking a JSON answer against the client's own `json_schema` without letting the client's regular
expressions hold the process: every `pattern` / `patternProperties` is matched by RE2 (linear time, bounded
memory) instead of Python's backtracking `re`, and the whole check runs in a thread under a time budget.

A pattern RE2 cannot take (backreferences, lookaround) cannot be checked: the answer is then judged by
parsing alone. A pattern that is not a regular expression at all is refused with the request (400)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import re
from typing import Any

import jsonschema
import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import re2
from referencing import Registry

CHECK_BUDGET_S = 2.0  # an answer not judged by then is returned as it is
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 8 << 20  # per compiled pattern; a larger one is "cannot be checked"
_RE2_OPTIONS.log_errors = False


class Unverifiable(Exception):
    """The schema uses a pattern the safe engine cannot run."""


@functools.lru_cache(maxsize=512)
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


def broken_pattern(schema: Any) -> tuple[str, str] | None:
    """(path, message) of the first pattern in a schema that is no regular expression at all."""
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            candidates = []
            if isinstance(node.get("pattern"), str):
                candidates.append((node["pattern"], f"{path}.pattern"))
            if isinstance(node.get("patternProperties"), dict):
                candidates += [(p, f"{path}.patternProperties") for p in node["patternProperties"]]
            for pattern, where in candidates:
                problem = _pattern_problem(pattern)
                if problem:
                    return where.lstrip("."), problem
            stack.extend((v, f"{path}.{k}") for k, v in node.items() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, f"{path}.{i}") for i, v in enumerate(node) if isinstance(v, dict | list))
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
    try:
        content = response["choices"][0]["message"]["content"]
        data = json.loads(content)
    except (KeyError, IndexError, TypeError, ValueError, RecursionError):
        return False
    fmt = request.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
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


async def answer_ok_in_time(response: dict[str, Any], request: dict[str, Any]) -> bool:
    """answer_ok off the event loop; an answer that cannot be judged within the budget counts as good."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(answer_ok, response, request), CHECK_BUDGET_S)
    except TimeoutError:
        return True
