"""Tool calls in the Hermes/Qwen format — `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the
model's text — turned into OpenAI's `tool_calls`, whole or as a stream: the text around calls is content, a
call's id and name go first, then its arguments as they are generated."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from backends.grammar import TOOL_CLOSE, TOOL_OPEN

_OPEN = TOOL_OPEN.rstrip("\n")  # "<tool_call>"; the newline after it is optional in practice
_CLOSE = TOOL_CLOSE.lstrip("\n")
_ARGUMENTS = re.compile(r'"arguments"\s*:\s*')
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass
class ToolEvent:
    kind: str  # content | call (a new call: id, name) | arguments (more of the current call's arguments)
    text: str = ""
    call_id: str = ""
    name: str = ""
    index: int = 0


@dataclass
class ToolCallParser:
    """Feed it the answer's text as it arrives; it says what is content and what is a call."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    _buffer: str = ""  # text not yet classified
    _in_call: bool = False
    _args_sent: int = 0  # characters of the current call's arguments already given out
    _named: bool = False

    def feed(self, text: str, final: bool = False) -> list[ToolEvent]:
        self._buffer += text
        events: list[ToolEvent] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(_OPEN)
                if start < 0:
                    # Hold back what could be the start of "<tool_call>".
                    cut = len(self._buffer) - (0 if final else _partial_suffix(self._buffer, _OPEN))
                    content, self._buffer = self._buffer[:cut], self._buffer[cut:]
                    if content:
                        events.append(ToolEvent("content", content))
                    return events
                if start:
                    events.append(ToolEvent("content", self._buffer[:start]))
                self._buffer = self._buffer[start + len(_OPEN):]
                self._in_call, self._named, self._args_sent = True, False, 0
            end = self._buffer.find(_CLOSE)
            body = self._buffer if end < 0 else self._buffer[:end]
            events += self._call_progress(body, complete=end >= 0 or final)
            if end < 0:
                return events
            self._buffer = self._buffer[end + len(_CLOSE):]
            self._in_call = False

    def _call_progress(self, body: str, complete: bool) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if not self._named:
            name = _NAME.search(body)
            if name is None:
                return events if not complete else self._broken(body)
            self.calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                               "function": {"name": json.loads(f'"{name.group(1)}"'), "arguments": ""}})
            self._named = True
            call = self.calls[-1]
            events.append(ToolEvent("call", call_id=call["id"], name=call["function"]["name"],
                                    index=len(self.calls) - 1))
        arguments = _ARGUMENTS.search(body)
        if arguments is None:
            return events
        value, _ = _value_prefix(body[arguments.end():])  # never past the arguments' own end
        text = value[self._args_sent:]
        if text:
            self._args_sent += len(text)
            self.calls[-1]["function"]["arguments"] += text
            events.append(ToolEvent("arguments", text, index=len(self.calls) - 1))
        return events

    def _broken(self, body: str) -> list[ToolEvent]:
        """A call without a name: given back as plain content rather than lost."""
        self._named = True
        return [ToolEvent("content", _OPEN + "\n" + body)]


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def _value_prefix(text: str) -> tuple[str, bool]:
    """The JSON object or array at the start of `text` as far as it has arrived, and whether it is complete
    (then without anything after it: the call's closing brace, the closing tag)."""
    text = text.lstrip()
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                return text[:i + 1], True
    return text, False


def parse(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer: its content (None when there is only calls) and its tool calls."""
    parser = ToolCallParser()
    content = "".join(e.text for e in parser.feed(text, final=True) if e.kind == "content")
    return (content.strip() or None) if parser.calls else content, parser.calls


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's assistant tool_calls carry arguments as a JSON string; chat templates expect a mapping."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for call in calls:
                function = dict(call.get("function") or {}) if isinstance(call, dict) else {}
                if isinstance(function.get("arguments"), str):
                    with contextlib.suppress(ValueError):  # not JSON: the template gets it as it is
                        function["arguments"] = json.loads(function["arguments"])
                fixed.append({**call, "function": function})
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out
