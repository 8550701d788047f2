"""Structural limits on a JSON body, held before and while it is parsed: objects and arrays counted in the raw
bytes, nesting depth (a 400 naming where), so no body can make a parser, a validator or a recursive walk (the
cache key, secret redaction, serialisation) run out of memory or stack. Both servers' /v1 bodies and the admin
API's go through `load_json`. Refusing a body costs no more than parsing it: every check is one linear pass."""

from __future__ import annotations

import unicodedata
from typing import Any

import orjson
import re2

from backends.wire.errors import bad_request

MAX_DEPTH = 64  # JSON nesting; deeper is a 400 (nothing an OpenAI client sends comes close)
# JSON objects and arrays per body: parsed, each costs ~60 bytes of Python memory (16 MB of `[],` would be
# ~1 GB); a long conversation with tools has a few thousand.
MAX_CONTAINERS = 100_000
_JSON_STRING = re2.compile(rb'"(?:[^"\\]|\\.)*"')
# In the raw bytes: every string (a key when a colon follows), and the structural characters.
_JSON_TOKEN = re2.compile(rb'"(?:[^"\\]|\\.)*"(\s*:)?|[\[\]{},]')
# How far into the raw bytes a body deeper than orjson goes (1,024 levels) is searched for the place to name:
# such bodies open their brackets early, and a longer scan would cost a refusal more than a parse.
_SCAN_BYTES = 8 * 1024
_SEGMENT_CHARS = 64  # a key named in an error is cut to this
INLINE_PARSE_BYTES = 1 << 20  # servers parse larger bodies off the event loop


def load_json(raw: bytes) -> Any:
    if _too_many_containers(raw):
        raise bad_request(f"The request has more than {MAX_CONTAINERS:,} JSON objects and arrays.", None,
                          "invalid_value")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):  # deeper than orjson goes: name the place from the raw bytes
            _refuse_depth(_raw_path_deeper_than(raw, MAX_DEPTH))
        raise bad_request("We could not parse the JSON body of your request. (HINT: This likely means "
                          "you aren't using your HTTP library correctly.)") from None
    if isinstance(value, dict | list) and _nesting(raw) > MAX_DEPTH + 1:
        # The place to name: off the first bytes when it lies there (crafted bodies open their brackets early),
        # else by a walk of the parsed value.
        _refuse_depth(_raw_path_deeper_than(raw, MAX_DEPTH) or _deeper_than(value, MAX_DEPTH))
    return value


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _nesting(raw: bytes) -> int:
    """How many containers are open at the deepest point, read off the brackets outside strings: C-speed passes
    over the bytes and a Python step per bracket (at most 2 x MAX_CONTAINERS), never one per value — a walk of
    the parsed value visits every number of a 16 MB token-id list."""
    brackets = (_JSON_STRING.sub(b"", raw) if b'"' in raw else raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for c in brackets:
        if c in (91, 123):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _refuse_depth(path: str | None) -> None:
    where = f" (at '{path}')" if path else ""
    raise bad_request(f"The request nests JSON more than {MAX_DEPTH} levels deep{where}.", path, "invalid_value")


def _too_many_containers(raw: bytes) -> bool:
    """Counted in the raw bytes, before parsing builds them; brackets inside strings do not count."""
    if raw.count(b"{") + raw.count(b"[") <= MAX_CONTAINERS:
        return False
    outside_strings = _JSON_STRING.sub(b"", raw)  # RE2: linear, no recursion
    return outside_strings.count(b"{") + outside_strings.count(b"[") > MAX_CONTAINERS


def _deeper_than(value: Any, limit: int) -> str | None:
    """The path to the first container nested deeper than `limit`, or None. One iterative pass over the
    containers (there are at most MAX_CONTAINERS), each remembering its parent, so the path is read back."""
    parents: list[tuple[int, Any]] = []  # per container visited: (its parent's index, its key there)
    stack: list[tuple[Any, int, int, Any]] = [(value, 0, -1, None)]
    while stack:
        node, depth, parent, key = stack.pop()
        index = len(parents)
        parents.append((parent, key))
        if depth > limit:
            keys = []
            while index > 0:
                index, key = parents[index]
                keys.append(key)
            return _path(keys[::-1])
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((v, depth + 1, index, k) for k, v in items if isinstance(v, dict | list))
    return None


def _raw_path_deeper_than(raw: bytes, limit: int) -> str | None:
    """The path to the first container nested deeper than `limit`, read off the first _SCAN_BYTES of the raw
    bytes without parsing them; None when it lies further in."""
    stack: list[list[Any]] = []  # per open container: [is an object, its current key or index]
    for match in _JSON_TOKEN.finditer(raw[:_SCAN_BYTES]):
        token = match.group(0)
        if token[:1] == b'"':
            if match.group(1) and stack:
                stack[-1][1] = _decoded(token[:token.rindex(b'"') + 1])
        elif token in (b"{", b"["):
            if len(stack) > limit:
                return _path([key for _, key in stack])
            stack.append([token == b"{", None if token == b"{" else 0])
        elif token in (b"}", b"]"):
            if stack:
                stack.pop()
        elif stack and not stack[-1][0]:  # a comma in an array: the next index
            stack[-1][1] += 1
    return None


def _decoded(quoted: bytes) -> str:
    try:
        return orjson.loads(quoted)
    except orjson.JSONDecodeError:
        return quoted[1:-1].decode("utf-8", "replace")


def _path(keys: list[Any]) -> str:
    """`a.0.b…`: at most eight segments, each cut short and without control or bidirectional-text characters
    (it is echoed to the client and may reach a terminal)."""
    segments = ["".join(c for c in str(k)[:_SEGMENT_CHARS] if unicodedata.category(c)[0] != "C")
                for k in keys[:8]]
    return ".".join(segments) + (".…" if len(keys) > 8 else "")
