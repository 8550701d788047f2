"""Structured outputs by constrained decoding, with xgrammar (the engine vLLM and SGLang use): a request's
constraint — JSON (any object, or a schema), a regular expression, a choice of strings, an EBNF grammar, or a
forced tool call — is compiled once into a grammar; each of its rows gets a matcher that masks, before every
sampling step, the tokens the grammar does not allow there.

A grammar only says what may come next, not when to stop: a model that never closes a string (a random-weight
one will not) would run into max_tokens and leave broken JSON. So when a row's remaining budget falls to what
closing its open structures needs, it enters closing mode: among the allowed tokens it prefers the end of the
answer, then tokens made only of closing brackets, then closing quotes."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import orjson
import torch
import xgrammar as xgr

from backends.vocab import Vocab

TOOL_OPEN, TOOL_CLOSE = "<tool_call>\n", "\n</tool_call>"  # Hermes/Qwen's tool-call format


@dataclass(frozen=True)
class Constraint:
    kind: str  # json_object | json_schema | regex | choice | grammar | tool_call
    spec: Any = None  # the schema, pattern, choices, EBNF text, or the [function, ...] a call must use
    param: str = ""  # the request field it came from (named in a 400)

    @property
    def json_like(self) -> bool:
        return self.kind in ("json_object", "json_schema", "tool_call")

    def key(self) -> bytes:
        return orjson.dumps([self.kind, self.spec], option=orjson.OPT_SORT_KEYS)


class GrammarError(ValueError):
    """The constraint cannot be compiled (an invalid schema, pattern or grammar): the request's 400."""


class Grammars:
    """One per worker: the tokenizer's grammar view, a compiler (it caches compiled grammars) and the token
    classes of closing mode. Thread-safe: requests compile in threads, the engine thread matches."""

    def __init__(self, vocab: Vocab, stop_ids: list[int]) -> None:
        self.vocab = vocab
        self._stop_ids = stop_ids
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._classes: dict[str, torch.Tensor] = {}  # closing mode's token classes, built with the compiler

    def _ready(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self.vocab.tokenizer, vocab_size=self.vocab.size,
                                                          stop_token_ids=self._stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
                self._classes = self._closing_classes()
            return self._compiler

    def compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        compiler = self._ready()
        try:
            if constraint.kind == "json_object":  # compact JSON: a model cannot pad it with whitespace forever
                return compiler.compile_json_schema({"type": "object"}, any_whitespace=False)
            if constraint.kind == "json_schema":
                return compiler.compile_json_schema(constraint.spec, any_whitespace=False)
            if constraint.kind == "regex":
                return compiler.compile_regex(constraint.spec)
            if constraint.kind == "choice":
                alternatives = " | ".join(orjson.dumps(str(c)).decode() for c in constraint.spec)
                return compiler.compile_grammar(f"root ::= {alternatives}")
            if constraint.kind == "grammar":
                return compiler.compile_grammar(constraint.spec)
            if constraint.kind == "tool_call":
                return compiler.compile_grammar(xgr.Grammar.union(*(_tool_call(f) for f in constraint.spec)))
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(str(exc).splitlines()[0][:300] or "invalid constraint") from None
        raise GrammarError(f"unknown constraint {constraint.kind!r}")

    @staticmethod
    def matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        return xgr.GrammarMatcher(compiled)

    def _closing_classes(self) -> dict[str, torch.Tensor]:
        """[V] masks: the end of the answer; tokens made only of `}`/`]`; only of `,`; a `"` with nothing but
        `}`/`]` after it; and a progress score (the last resort: the longest token that opens the least)."""
        size = self.vocab.size
        classes = {name: torch.zeros(size, dtype=torch.bool) for name in ("ends", "brackets", "comma", "quote")}
        classes["ends"][self._stop_ids] = True
        progress = torch.zeros(size, dtype=torch.float32)
        for token_id, raw in enumerate(self.vocab.raw):
            # the last resort's score: long tokens finish a spelled-out key or literal sooner; `{`/`[` open more
            progress[token_id] = len(raw) - 100 * (raw.count(b"{") + raw.count(b"["))
            text = raw.strip()
            if not text:
                continue
            classes["brackets"][token_id] = not text.strip(b"}]")
            classes["comma"][token_id] = not text.strip(b",")
            # a quote, then nothing or closers: a comma would start another element the budget may not have
            classes["quote"][token_id] = text.startswith(b'"') and not text.strip(b'"}]')
        classes["progress"] = progress
        return classes

    def prefer_closing(self, logits: torch.Tensor, in_string: bool, escaped: bool = False) -> None:
        """In place, on one row whose disallowed tokens are already -inf: keep only the most closing class that
        has an allowed token. Inside a string a bracket is just text: the closing quote comes first there. A comma
        (after a number, say) moves on to the next required key, a quote opens it."""
        allowed = logits > float("-inf")
        # Right after a backslash a quote is text: finish the escape first (the longest token, below).
        order = () if escaped else ("ends", "quote") if in_string else ("ends", "brackets", "comma", "quote")
        for name in order:
            keep = allowed & self._classes[name]
            if bool(keep.any()):
                logits.masked_fill_(~keep, float("-inf"))
                return
        # Nothing closes yet (a key the grammar spells out, a number's digits, a value to begin): the longest
        # allowed token that opens the fewest brackets.
        progress = torch.where(allowed, self._classes["progress"], float("-inf"))
        logits.masked_fill_(progress < progress.max(), float("-inf"))


def _tool_call(function: dict[str, Any]) -> xgr.Grammar:
    """<tool_call>\\n{"name": <this function>, "arguments": <its parameters>}\\n</tool_call>"""
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": function["name"]},
                             "arguments": function.get("parameters") or {"type": "object"}}}
    literal = lambda text: xgr.Grammar.from_ebnf(f"root ::= {orjson.dumps(text).decode()}")  # noqa: E731
    return xgr.Grammar.concat(literal(TOOL_OPEN), xgr.Grammar.from_json_schema(schema, any_whitespace=False),
                              literal(TOOL_CLOSE))


class OpenStructures:
    """How much JSON is still open in an answer (brackets, a string, required keys not written yet), to know
    when closing must start."""

    def __init__(self, constraint: Constraint | None = None) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.pending = _required_keys(constraint)  # each costs a key, a colon and a small value to close
        self._recent = ""

    def feed(self, text: str) -> None:
        if self.pending:
            self._recent = (self._recent + text)[-200:]
            self.pending = {k for k in self.pending if f'"{k}":' not in self._recent.replace('" :', '":')}
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth = max(self.depth - 1, 0)

    def tokens_to_close(self) -> int:
        """Generous: closing usually takes a token per bracket; a string or a literal tail may take a few."""
        return 6 + 2 * self.depth + (4 if self.in_string else 0) + 8 * len(self.pending)


def _required_keys(constraint: Constraint | None) -> set[str]:
    """Every property name a schema requires, at any depth (a forced tool call's own two as well)."""
    if constraint is None or constraint.kind not in ("json_schema", "tool_call"):
        return set()
    schemas = [constraint.spec] if constraint.kind == "json_schema" else \
        [f.get("parameters") or {} for f in constraint.spec[:1]]
    keys = {"name", "arguments"} if constraint.kind == "tool_call" else set()
    stack = list(schemas)
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            keys |= {k for k in node.get("required", []) if isinstance(k, str)} if isinstance(
                node.get("required"), list) else set()
            stack.extend(v for k, v in node.items() if k not in ("default", "const", "enum", "examples"))
        elif isinstance(node, list):
            stack.extend(node)
    return keys
