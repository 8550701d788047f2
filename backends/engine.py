"""Continuous batching: one thread owns the model; requests join the running batch between decode
steps and leave it when they finish, so a long request never holds a short one back.

The batch's KV cache is kept left-padded: per layer keys/values [B, H, T, D] plus an attention mask
[B, T] (0 on padding) and a position per row. New requests are prefilled together, then their caches
are padded to the batch's T (or the batch to theirs) and concatenated on the batch dimension."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from backends.loading import LoadedModel
from backends.sampler import SamplerStats, SamplingParams, logprobs, sample

log = logging.getLogger("backends.engine")

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth its own forward
MAX_CACHED_PREFIX_TOKENS = 8192  # bounds the prefix cache's memory (KV of this many tokens, all entries)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; 0..20: that many alternatives per token
    seed: int | None = None
    cancelled: bool = False
    # filled by submit(): where the engine thread delivers events
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None


@dataclass
class TokenEvent:
    text: str  # new text, already cut at a stop string
    tokens: list[dict[str, Any]]  # per generated token: id, text, logprob, top [(text, logprob)]


@dataclass
class DoneEvent:
    finish_reason: str  # stop | length | error
    completion_tokens: int
    error: str | None = None


@dataclass
class _Row:
    req: GenRequest
    generator: torch.Generator
    position: int  # position id of the next input token
    output_ids: list[int] = field(default_factory=list)
    sent_chars: int = 0


class Engine:
    def __init__(self, lm: LoadedModel, max_batch: int = 32, max_prefill_tokens: int = 4096) -> None:
        self.lm = lm
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.stats = SamplerStats()
        self._waiting: queue.Queue[GenRequest] = queue.Queue()
        self._rows: list[_Row] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=lm.device)  # [B, T]
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        self._counts = torch.zeros(0, vocab, dtype=torch.float32, device=lm.device)  # [B, V]
        self._seen = torch.zeros(0, vocab, dtype=torch.bool, device=lm.device)  # [B, V]
        self._pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self._prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.steps = 0

    # --- public, called from the event loop ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._waiting.put(None)  # type: ignore[arg-type]  # wakes the thread
        self._thread.join(timeout=30)

    def submit(self, req: GenRequest) -> asyncio.Queue:
        req.loop = asyncio.get_running_loop()
        req.events = asyncio.Queue()
        self._waiting.put(req)
        return req.events

    @property
    def active(self) -> int:
        return len(self._rows)

    # --- the engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            new = self._take_waiting(block=not self._rows)
            try:
                if new:
                    self._prefill(new)
                if self._rows:
                    self._decode_step()
            except Exception as exc:  # a failed step fails its requests, never the worker
                log.exception("engine step failed")
                failed = {id(row.req) for row in self._rows}
                for row in self._rows:
                    self._emit(row.req, DoneEvent("error", len(row.output_ids), error=str(exc)))
                for req in new:  # a prefill that failed before its rows joined the batch
                    if id(req) not in failed:
                        self._emit(req, DoneEvent("error", 0, error=str(exc)))
                self._reset_batch()

    def _take_waiting(self, block: bool) -> list[GenRequest]:
        taken: list[GenRequest] = []
        budget = self.max_prefill_tokens
        if len(self._rows) >= self.max_batch:
            return taken
        try:
            item = self._waiting.get(timeout=0.5) if block else self._waiting.get_nowait()
        except queue.Empty:
            return taken
        while item is not None:
            if not item.cancelled:
                taken.append(item)
                budget -= len(item.prompt_ids)
            if len(self._rows) + len(taken) >= self.max_batch or budget <= 0:
                break
            try:
                item = self._waiting.get_nowait()
            except queue.Empty:
                break
        return taken

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> tuple[torch.Tensor, list]:
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        # logits_to_keep=1: only the last position's logits are needed; skips most of the output layer.
        out = self.lm.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=1)
        new_kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits[:, -1, :].float(), new_kv  # [B, V] fp32

    def _prefill(self, reqs: list[GenRequest]) -> None:
        """One forward for all new prompts. A prefix they share (the chat template's system part, say) is
        computed once, kept in a small cache, and only the rest of each prompt runs batched:
        row layout [shared prefix P][left padding][own suffix]."""
        dev = self.lm.device
        generators = {}
        for r in reqs:
            gen = torch.Generator(device=dev)
            # Any integer seed works (OpenAI's are int64, some clients send uint64); unseeded requests draw
            # from the OS, not from the global torch RNG that model construction seeded.
            gen.manual_seed(r.seed % 2**64 if r.seed is not None else secrets.randbits(63))
            generators[id(r)] = gen
        shared = self._shared_prefix([r.prompt_ids for r in reqs])
        suffixes = [r.prompt_ids[len(shared):] for r in reqs]
        width = max(len(x) for x in suffixes)
        ids = torch.full((len(reqs), width), self._pad_id, dtype=torch.long, device=dev)  # [k, S] left-padded
        own = torch.zeros(len(reqs), width, dtype=torch.long, device=dev)
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix):] = torch.tensor(suffix, device=dev)
            own[i, width - len(suffix):] = 1
        positions = len(shared) + (own.cumsum(-1) - 1).clamp(min=0)  # [k, S]
        kv = None
        mask = own
        if shared:
            mask = torch.cat([torch.ones(len(reqs), len(shared), dtype=torch.long, device=dev), own], dim=1)
            kv = [(k.expand(len(reqs), -1, -1, -1).contiguous(), v.expand(len(reqs), -1, -1, -1).contiguous())
                  for k, v in self._prefix_kv(shared)]
        logits, kv = self._forward(ids, mask, positions, kv)
        rows = [_Row(r, generators[id(r)], position=len(r.prompt_ids)) for r in reqs]
        seen = torch.zeros(len(reqs), self._seen.shape[1], dtype=torch.bool, device=dev)
        for i, r in enumerate(reqs):
            seen[i, torch.tensor(r.prompt_ids, device=dev)] = True
        self._merge(rows, kv, mask, seen)
        self._sample_and_emit(logits, first=len(self._rows) - len(rows))

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[int, ...]:
        """The longest cached prefix of every prompt, or, for several prompts, their longest common prefix
        when it is long enough to be worth a separate forward. Always leaves each prompt one own token."""
        limit = min(len(p) for p in prompts) - 1
        common = 0
        while common < limit and all(p[common] == prompts[0][common] for p in prompts):
            common += 1
        head = tuple(prompts[0][:common])
        cached = [key for key in self._prefixes if len(key) <= common and head[:len(key)] == key]
        if cached:
            best = max(cached, key=len)
            self._prefixes.move_to_end(best)
            if len(prompts) == 1 or common - len(best) < MIN_SHARED_PREFIX:
                return best
        worth = len(prompts) > 1 and MIN_SHARED_PREFIX <= common <= MAX_CACHED_PREFIX_TOKENS // 4
        return head if worth else ()

    def _prefix_kv(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """KV of a prefix ([1, H, P, D] per layer), computed alone and kept (LRU) for later prefills."""
        if prefix not in self._prefixes:
            ids = torch.tensor([prefix], dtype=torch.long, device=self.lm.device)
            ones = torch.ones_like(ids)
            _, kv = self._forward(ids, ones, (ones.cumsum(-1) - 1), None)
            self._prefixes[prefix] = kv
            while sum(map(len, self._prefixes)) > MAX_CACHED_PREFIX_TOKENS and len(self._prefixes) > 1:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(prefix)
        return self._prefixes[prefix]

    def _merge(self, rows: list[_Row], kv: list, mask: torch.Tensor, seen: torch.Tensor) -> None:
        if not self._rows:
            self._kv, self._mask = kv, mask
        else:
            old_t, new_t = self._mask.shape[1], mask.shape[1]
            width = max(old_t, new_t)
            self._kv = [(torch.cat([_left_pad(k0, width), _left_pad(k1, width)]),
                         torch.cat([_left_pad(v0, width), _left_pad(v1, width)]))
                        for (k0, v0), (k1, v1) in zip(self._kv, kv, strict=True)]
            self._mask = torch.cat([_left_pad_2d(self._mask, width), _left_pad_2d(mask, width)])
        self._counts = torch.cat([self._counts, torch.zeros(len(rows), self._counts.shape[1],
                                                             device=self._counts.device)])
        self._seen = torch.cat([self._seen, seen])
        self._rows.extend(rows)

    def _decode_step(self) -> None:
        dev = self.lm.device
        last = torch.tensor([[row.output_ids[-1]] for row in self._rows], dtype=torch.long, device=dev)  # [B, 1]
        positions = torch.tensor([[row.position] for row in self._rows], dtype=torch.long, device=dev)  # [B, 1]
        self._mask = torch.cat([self._mask, torch.ones(len(self._rows), 1, dtype=torch.long, device=dev)], dim=1)
        logits, self._kv = self._forward(last, self._mask, positions, self._kv)
        for row in self._rows:
            row.position += 1
        self.steps += 1
        self._sample_and_emit(logits, first=0)

    def _sample_and_emit(self, logits: torch.Tensor, first: int) -> None:
        """Sample for rows first.. (a prefill's new rows, or the whole batch), emit, retire finished rows."""
        rows = self._rows[first:]
        tokens = sample(logits, [r.req.params for r in rows], [r.generator for r in rows],
                        self._counts[first:], self._seen[first:], self.stats)
        want_lp = [i for i, r in enumerate(rows) if r.req.top_logprobs is not None]
        lp = logprobs(logits[want_lp]) if want_lp else None  # [b, V]
        finished: list[int] = []
        for i, row in enumerate(rows):
            token = int(tokens[i])
            self._counts[first + i, token] += 1
            self._seen[first + i, token] = True
            row.output_ids.append(token)
            entry = {"id": token}
            if lp is not None and i in want_lp:
                lrow = lp[want_lp.index(i)]
                entry["logprob"] = float(lrow[token])
                k = row.req.top_logprobs or 0
                if k:
                    top = torch.topk(lrow, k)
                    entry["top"] = [(int(t), float(v)) for v, t in zip(top.values, top.indices, strict=True)]
            done = self._advance(row, entry)
            if done:
                finished.append(first + i)
        if finished or any(r.req.cancelled for r in self._rows):
            self._retire(set(finished) | {j for j, r in enumerate(self._rows) if r.req.cancelled})

    def _advance(self, row: _Row, entry: dict[str, Any]) -> bool:
        """Detokenise, apply stop strings and limits, emit the new text. True when the row is done."""
        req, tok = row.req, self.lm.tokenizer
        finish = None
        eos = entry["id"] in self.lm.eos_token_ids
        if eos:
            finish = "stop"
            row.output_ids.pop()  # the end-of-turn token is not part of the answer
        text = tok.decode(row.output_ids, skip_special_tokens=True)
        hits = [text.find(s) for s in req.stop if s and s in text]
        if hits:
            text, finish = text[:min(hits)], "stop"
        if finish is None and (len(row.output_ids) >= req.max_tokens or row.position + 1 >= self.lm.context_length):
            finish = "length"
        safe = len(text)
        if finish is None:
            # Hold back what could still turn into a stop string, and half-decoded UTF-8.
            safe -= max((len(s) - 1 for s in req.stop), default=0)
            while safe > row.sent_chars and text[safe - 1] == "\ufffd":
                safe -= 1
        delta = text[row.sent_chars:safe] if safe > row.sent_chars else ""
        row.sent_chars = max(row.sent_chars, safe)
        entry["text"] = tok.decode([entry["id"]])
        if "top" in entry:
            entry["top"] = [(t, tok.decode([t]), v) for t, v in entry["top"]]
        self._emit(req, TokenEvent(delta, [] if eos else [entry]))
        if finish is not None:
            self._emit(req, DoneEvent(finish, len(row.output_ids) + (1 if eos else 0)))
            return True
        return False

    def _retire(self, gone: set[int]) -> None:
        keep = [i for i in range(len(self._rows)) if i not in gone]
        for i in gone:
            if self._rows[i].req.cancelled:
                log.debug("request cancelled after %d tokens", len(self._rows[i].output_ids))
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.lm.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[index]
        # Columns that are padding for every remaining row can go: T shrinks back as old rows leave.
        start = int((mask.sum(0) > 0).nonzero()[0]) if bool((mask.sum(0) > 0).any()) else 0
        self._mask = mask[:, start:]
        self._kv = [(k[index, :, start:], v[index, :, start:]) for k, v in self._kv]
        self._counts, self._seen = self._counts[index], self._seen[index]

    def _reset_batch(self) -> None:
        self._rows, self._kv = [], []
        self._mask = self._mask[:0, :0]
        self._counts, self._seen = self._counts[:0], self._seen[:0]

    @staticmethod
    def _emit(req: GenRequest, event: TokenEvent | DoneEvent) -> None:
        if req.loop is not None and req.events is not None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: the worker is shutting down
                req.loop.call_soon_threadsafe(req.events.put_nowait, event)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[B, H, T, D] → [B, H, width, D] with zeros on the left."""
    missing = width - t.shape[2]
    if missing <= 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)


def _left_pad_2d(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing <= 0 else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
