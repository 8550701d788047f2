"""One choice of an answer, built from the engine's events into OpenAI's shapes: a whole message or text, or
the deltas of a stream; logprobs as chat or completions report them (with each token's raw bytes), the echoed
prompt with its logprobs, vLLM's `prompt_logprobs`, and tool calls parsed out of the text."""

from __future__ import annotations

from typing import Any

from backends.engine import DoneEvent, PromptEvent, TokenEvent
from backends.protocol import Plan
from backends.tools import ToolCallParser, ToolEvent
from backends.vocab import Vocab


class ChoiceBuilder:
    def __init__(self, index: int, chat: bool, plan: Plan, vocab: Vocab, prompt_text: str = "") -> None:
        self.index = index
        self.chat = chat
        self.plan = plan
        self.vocab = vocab
        self.text = prompt_text if plan.echo else ""  # completions with echo: the prompt comes first
        self.offset = len(self.text)  # text_offset of the next generated token
        self.tokens: list[dict[str, Any]] = []
        self.prompt: list[dict[str, Any]] | None = None
        self.done: DoneEvent | None = None
        self.tools = ToolCallParser() if plan.tool_calls else None
        self.content = ""

    # --- names of tokens ------------------------------------------------------------------------------

    def _name(self, token_id: int) -> str:
        if self.plan.token_ids:
            return f"token_id:{token_id}"
        return self.vocab.bytes_of(token_id).decode("utf-8", "replace")

    def _chat_logprob(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self._name(token_id), "logprob": logprob, "bytes": list(self.vocab.bytes_of(token_id))}

    def _chat_logprobs(self, tokens: list[dict[str, Any]]) -> dict[str, Any]:
        return {"content": [{**self._chat_logprob(t["id"], t["logprob"]),
                             "top_logprobs": [self._chat_logprob(i, v) for i, v in t.get("top", [])]}
                            for t in tokens if "logprob" in t]}

    def _completion_logprobs(self, tokens: list[dict[str, Any]], offset: int | None = None) -> dict[str, Any]:
        """Legacy completions logprobs; text offsets continue from the stream's last (or from `offset`)."""
        if offset is not None:
            self.offset = offset
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            if "logprob" not in t:
                continue
            name = self._name(t["id"])
            out["tokens"].append(name)
            out["token_logprobs"].append(t["logprob"])
            out["top_logprobs"].append({self._name(i): v for i, v in t["top"]} if "top" in t else
                                       (None if t["logprob"] is None else {}))
            out["text_offset"].append(self.offset)
            self.offset += len(self.vocab.bytes_of(t["id"]).decode("utf-8", "replace"))
        return out

    def prompt_logprobs(self) -> list[dict[str, Any] | None] | None:
        """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: logprob, rank,
        decoded_token} for the token and its top alternatives."""
        if self.prompt is None or self.plan.prompt_logprobs is None:
            return None
        out: list[dict[str, Any] | None] = []
        for t in self.prompt:
            if t["logprob"] is None:
                out.append(None)
                continue
            entry = {str(t["id"]): {"logprob": t["logprob"], "rank": t["rank"], "decoded_token": self._name(t["id"])}}
            for rank, (i, v) in enumerate(t.get("top", []), start=1):
                entry.setdefault(str(i), {"logprob": v, "rank": rank, "decoded_token": self._name(i)})
            out.append(entry)
        return out

    # --- events -----------------------------------------------------------------------------------------

    def on_prompt(self, event: PromptEvent) -> list[dict[str, Any]]:
        """A stream's first chunk, when the prompt is echoed (with its logprobs, if asked)."""
        self.prompt = event.tokens
        logprobs = None
        if self.plan.echo and self.plan.top_logprobs is not None:
            self.offset = 0  # the echoed prompt's own tokens come first in the logprobs
            self.tokens.extend(event.tokens)
            logprobs = self._completion_logprobs(event.tokens)
        return [self._chunk_choice(self.text, None, logprobs)] if self.plan.echo and not self.chat else []

    def on_tokens(self, event: TokenEvent) -> list[dict[str, Any]]:
        """What a stream sends for these tokens (possibly nothing yet)."""
        self.tokens.extend(event.tokens)
        deltas = self._route(event.text)
        logprobs = self._logprobs(event.tokens) if event.tokens and self.plan.top_logprobs is not None else None
        if not deltas and logprobs is not None:
            deltas = [{}] if self.chat else [""]
        return [self._chunk_choice(d, None, logprobs if n == 0 else None) for n, d in enumerate(deltas)]

    def on_done(self, event: DoneEvent) -> list[dict[str, Any]]:
        self.done = event
        deltas = self._route("", final=True)
        return [self._chunk_choice(d, None, None) for d in deltas] + [
            self._chunk_choice({} if self.chat else "", self.finish_reason, None)]

    @property
    def finish_reason(self) -> str:
        reason = self.done.finish_reason if self.done else "stop"
        return "tool_calls" if reason == "stop" and self.tools is not None and self.tools.calls else reason

    def _logprobs(self, tokens: list[dict[str, Any]]) -> dict[str, Any]:
        return self._chat_logprobs(tokens) if self.chat else self._completion_logprobs(tokens)

    def _route(self, text: str, final: bool = False) -> list[Any]:
        """Text into stream deltas: chat deltas (content, or tool calls), or completion text pieces."""
        if self.tools is None:
            self.content += text
            if not text:
                return []
            return [{"content": text}] if self.chat else [text]
        deltas = []
        for event in self.tools.feed(text, final=final):
            self.content += event.text if event.kind == "content" else ""
            deltas.append(_tool_delta(event))
        return deltas

    def _chunk_choice(self, delta: Any, finish: str | None, logprobs: Any) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": self.index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": self.index, "text": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return choice

    # --- the whole answer -------------------------------------------------------------------------------

    def choice(self) -> dict[str, Any]:
        """The non-streamed choice (after on_done)."""
        if self.tools is not None:
            self.tools.feed("", final=True)
        with_lp = self.plan.top_logprobs is not None
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": self.content}
            if self.tools is not None and self.tools.calls:
                message = {"role": "assistant", "content": self.content.strip() or None,
                           "tool_calls": self.tools.calls}
            return {"index": self.index, "message": message, "finish_reason": self.finish_reason,
                    "logprobs": self._chat_logprobs(self.tokens) if with_lp else None}
        start = 0 if self.plan.echo and self.prompt is not None else len(self.text)
        choice = {"index": self.index, "text": self.text + self.content, "finish_reason": self.finish_reason,
                  "logprobs": self._completion_logprobs(self.tokens, offset=start) if with_lp else None}
        if (prompt := self.prompt_logprobs()) is not None:
            choice["prompt_logprobs"] = prompt
        return choice


def _tool_delta(event: ToolEvent) -> dict[str, Any]:
    if event.kind == "content":
        return {"content": event.text}
    if event.kind == "call":
        return {"tool_calls": [{"index": event.index, "id": event.call_id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}


def apply(builder: ChoiceBuilder, event: TokenEvent | PromptEvent | DoneEvent) -> list[dict[str, Any]]:
    """Feeds one event; the stream chunks' choices it produces."""
    if isinstance(event, PromptEvent):
        return builder.on_prompt(event)
    if isinstance(event, TokenEvent):
        return builder.on_tokens(event)
    return builder.on_done(event)
