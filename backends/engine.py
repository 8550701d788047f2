"""Continuous batching: one thread owns the model; requests join the running batch between decode steps and
leave it when they finish, so a long request never holds a short one back.

The batch's KV cache is kept left-padded: per layer keys/values [B, H, T, D] plus an attention mask [B, T] (0 on
padding) and a position per row. New requests are prefilled together, then their caches are padded to the
batch's T (or the batch to theirs) and concatenated on the batch dimension. A request that scores its prompt
(prompt logprobs, echo) is prefilled alone with every position's logits. Constrained rows (backends.grammar)
have their disallowed tokens masked before sampling."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import xgrammar as xgr

from backends.decoder import forward_for
from backends.grammar import Grammars, OpenStructures
from backends.kv_cache import KVCache
from backends.loading import LoadedModel
from backends.metrics import EngineObserver, RequestTimes
from backends.prefix_cache import PrefixCache
from backends.sampler import SamplerStats, SamplingParams, logprobs, sample
from backends.text import TextStream
from backends.vocab import Vocab

log = logging.getLogger("backends.engine")


@dataclass
class GenRequest:
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # 0: only score the prompt
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None  # None: no logprobs; 0..20: that many alternatives per token
    seed: int | None = None
    grammar: xgr.CompiledGrammar | None = None  # constrained decoding
    constraint: Any = None  # what the grammar was compiled from (closing mode reads its required keys)
    prompt_logprobs: int | None = None  # score the prompt, with this many alternatives per token
    cancelled: bool = False
    # filled by submit(): where the engine thread delivers events
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    timing: RequestTimes | None = None  # set by a metrics observer (backends.metrics)


@dataclass
class TokenEvent:
    text: str  # new text, already cut at a stop string
    tokens: list[dict[str, Any]]  # per generated token: id, logprob, top [(id, logprob)]


@dataclass
class PromptEvent:
    tokens: list[dict[str, Any]]  # per prompt token: id, logprob (None for the first), top [(id, logprob)]


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
    text: TextStream
    output_ids: list[int] = field(default_factory=list)
    matcher: xgr.GrammarMatcher | None = None
    open: OpenStructures | None = None  # for closing mode, when the grammar is JSON


class Engine:
    def __init__(self, lm: LoadedModel, grammars: Grammars | None = None, max_batch: int = 32,
                 max_prefill_tokens: int | None = None, observer: EngineObserver | None = None) -> None:
        self.lm = lm
        self.vocab = lm.model.get_output_embeddings().weight.shape[0]
        self.grammars = grammars or Grammars(Vocab(lm.tokenizer, self.vocab), sorted(lm.eos_token_ids))
        self.max_batch = max_batch
        # a CPU prefills ~1k tokens/s on a small model; a GPU takes thousands in one step
        self.max_prefill_tokens = max_prefill_tokens or (2048 if lm.device.type == "cuda" else 96)
        self.stats = SamplerStats()
        self.observer = observer or EngineObserver()
        self._waiting: queue.Queue[GenRequest] = queue.Queue()  # from the event loop
        self._pending: collections.deque[GenRequest] = collections.deque()  # taken off the queue, not yet prefilled
        self._rows: list[_Row] = []
        self._skipped_decode = False  # the last loop prefilled without a decode step
        self._forward_pass = forward_for(lm.model)
        self._kv: KVCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=lm.device)  # [B, T]
        self._counts = torch.zeros(0, self.vocab, dtype=torch.float32, device=lm.device)  # [B, V]
        self._seen = torch.zeros(0, self.vocab, dtype=torch.bool, device=lm.device)  # [B, V]
        self._bitmask = xgr.allocate_token_bitmask(max_batch, self.vocab)  # [max_batch, ceil(V / 32)] int32
        self._pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        self._prefixes = PrefixCache(self._forward_alone)
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
        self.observer.submitted(req)
        self._waiting.put(req)
        return req.events

    @property
    def active(self) -> int:
        return len(self._rows)

    def load(self) -> tuple[int, int, int]:
        """Rows running, requests waiting, KV-cache columns held (batch and prefix cache); from any thread."""
        kv = self._kv  # one read: the engine thread may replace it meanwhile
        return (len(self._rows), len(self._pending) + self._waiting.qsize(),
                (kv.rows * kv.length if kv is not None else 0) + self._prefixes.tokens)

    # --- the engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            new = self._take_waiting(block=not self._rows)
            self.observer.prefilling(new)
            try:
                scoring = [r for r in new if r.prompt_logprobs is not None]
                for req in scoring:  # alone: they need every position's logits
                    self._prefill_scoring(req)
                plain = [r for r in new if r.prompt_logprobs is None]
                if plain:
                    self._prefill(plain)
                # Prefill first while requests wait (a burst's first tokens come sooner), but never twice in a
                # row: running streams get a token at least every other prefill.
                waiting = bool(self._pending) or not self._waiting.empty()
                skip = bool(new) and waiting and not self._skipped_decode
                if self._rows and not skip:
                    self._decode_step()
                self._skipped_decode = skip
            except Exception as exc:  # a failed forward fails the batch's requests, never the worker
                log.exception("engine step failed")
                failed = {id(row.req) for row in self._rows}
                for row in self._rows:
                    self._emit(row.req, DoneEvent("error", len(row.output_ids), error=str(exc)))
                for req in new:  # a prefill that failed before its rows joined the batch
                    if id(req) not in failed:
                        self._emit(req, DoneEvent("error", 0, error=str(exc)))
                self._reset_batch()

    def _take_waiting(self, block: bool) -> list[GenRequest]:
        """The next prefill's requests, in arrival order, within the prefill budget: prompt tokens not already
        in the prefix cache (at least one request, however long its prompt). What does not fit waits for the
        next step, so a burst of arrivals is prefilled in groups with decode steps between them: the running
        streams keep moving and the first group answers sooner (vLLM's max_num_batched_tokens, for prefill)."""
        try:
            while True:
                item = self._waiting.get(timeout=0.5) if block and not self._pending else self._waiting.get_nowait()
                if item is not None and not item.cancelled:
                    self._pending.append(item)
                block = False
        except queue.Empty:
            pass
        taken: list[GenRequest] = []
        budget = self.max_prefill_tokens
        while self._pending and len(self._rows) + len(taken) < self.max_batch:
            cost = len(self._pending[0].prompt_ids) - self._prefixes.cached(self._pending[0].prompt_ids)
            if taken and cost > budget:
                break
            taken.append(self._pending.popleft())
            budget -= cost
        return [r for r in taken if not r.cancelled]

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 kv: KVCache | None, every_position: bool = False) -> tuple[torch.Tensor, KVCache]:
        # Only the last position's logits unless asked: skips most of the output layer.
        logits, kv = self._forward_pass(input_ids, mask, positions, kv, every_position)  # [B, S or 1, V] fp32
        return (logits if every_position else logits[:, -1, :]), kv

    def _forward_alone(self, ids: list[int]) -> KVCache:
        """KV of one sequence computed alone (one row)."""
        batch = torch.tensor([ids], dtype=torch.long, device=self.lm.device)
        ones = torch.ones_like(batch)
        return self._forward(batch, ones, (ones.cumsum(-1) - 1), None)[1]

    def _new_row(self, req: GenRequest) -> _Row:
        gen = torch.Generator(device=self.lm.device)
        # Any integer seed works (OpenAI's are int64, some clients send uint64); unseeded requests draw from the
        # OS, not from the global torch RNG that model construction seeded.
        gen.manual_seed(req.seed % 2**64 if req.seed is not None else secrets.randbits(63))
        matcher = self.grammars.matcher(req.grammar) if req.grammar is not None else None
        return _Row(req, gen, position=len(req.prompt_ids), text=TextStream(self.lm.tokenizer, req.stop),
                    matcher=matcher, open=OpenStructures(req.constraint)
                    if matcher is not None and req.constraint is not None and req.constraint.json_like else None)

    def _prefill(self, reqs: list[GenRequest]) -> None:
        """One forward for all new prompts. A prefix they share (the chat template's system part, say) is
        computed once, kept in a small cache, and only the rest of each prompt runs batched:
        row layout [shared prefix P][left padding][own suffix]."""
        dev = self.lm.device
        shared = self._prefixes.shared([r.prompt_ids for r in reqs])
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
            kv = self._prefixes.kv(shared).expand(len(reqs))
        logits, kv = self._forward(ids, mask, positions, kv)
        self._join([self._new_row(r) for r in reqs], logits, kv, mask)

    def _prefill_scoring(self, req: GenRequest) -> None:
        """The prompt alone, every position's logits kept: each prompt token's logprob (and top alternatives)
        under the tokens before it, as a teacher-forced forward gives them."""
        dev = self.lm.device
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=dev)  # [1, L]
        mask = torch.ones_like(ids)
        logits, kv = self._forward(ids, mask, (mask.cumsum(-1) - 1), None, every_position=True)  # [1, L, V]
        lp = logprobs(logits[0, :-1])  # [L-1, V]: position i predicts token i+1
        targets = torch.tensor(req.prompt_ids[1:], dtype=torch.long, device=dev)
        chosen = lp.gather(1, targets[:, None])[:, 0] if len(targets) else lp[:0, 0]
        k = req.prompt_logprobs or 0
        top = torch.topk(lp, k) if k and len(targets) else None
        ranks = (lp > chosen[:, None]).sum(dim=-1) + 1 if len(targets) else chosen.long()  # 1: the likeliest
        tokens: list[dict[str, Any]] = [{"id": req.prompt_ids[0], "logprob": None}]
        for i, token in enumerate(req.prompt_ids[1:]):
            entry = {"id": token, "logprob": float(chosen[i]), "rank": int(ranks[i])}
            if top is not None:
                entry["top"] = [(int(t), float(v)) for v, t in zip(top.values[i], top.indices[i], strict=True)]
            tokens.append(entry)
        self._emit(req, PromptEvent(tokens))
        if req.max_tokens <= 0:
            self._emit(req, DoneEvent("length", 0))
            return
        self._join([self._new_row(req)], logits[:, -1, :], kv, mask)

    def _join(self, rows: list[_Row], logits: torch.Tensor, kv: KVCache, mask: torch.Tensor) -> None:
        """New rows (their prompts' KV and last logits) join the batch and sample their first token."""
        seen = torch.zeros(len(rows), self.vocab, dtype=torch.bool, device=self.lm.device)
        for i, row in enumerate(rows):
            seen[i, torch.tensor(row.req.prompt_ids, device=self.lm.device)] = True
        self._merge(rows, kv, mask, seen)
        self._sample_and_emit(logits, first=len(self._rows) - len(rows))

    def _merge(self, rows: list[_Row], kv: KVCache, mask: torch.Tensor, seen: torch.Tensor) -> None:
        if not self._rows or self._kv is None:
            self._kv, self._mask = kv, mask
        else:
            width = max(self._mask.shape[1], mask.shape[1])
            self._kv = self._kv.stack(kv)
            self._mask = torch.cat([_left_pad_2d(self._mask, width), _left_pad_2d(mask, width)])
        self._counts = torch.cat([self._counts, torch.zeros(len(rows), self.vocab, device=self._counts.device)])
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
        self.observer.decoded(len(self._rows))
        self._sample_and_emit(logits, first=0)

    def _constrain(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Masks, in place, what each constrained row's grammar does not allow next; a row near its budget's end
        keeps only its most closing allowed tokens (backends.grammar)."""
        constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
        if not constrained:
            return
        for i in constrained:
            rows[i].matcher.fill_next_token_bitmask(self._bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, self._bitmask[:len(rows)].to(logits.device), indices=constrained)
        for i in constrained:
            row = rows[i]
            left = row.req.max_tokens - len(row.output_ids)
            needed = row.open.tokens_to_close() if row.open is not None else 4
            if left <= needed:
                state = row.open or OpenStructures()
                self.grammars.prefer_closing(logits[i], in_string=state.in_string, escaped=state.escaped)

    def _sample_and_emit(self, logits: torch.Tensor, first: int) -> None:
        """Sample for rows first.. (a prefill's new rows, or the whole batch), emit, retire finished rows."""
        rows = self._rows[first:]
        want_lp = [i for i, r in enumerate(rows) if r.req.top_logprobs is not None]
        lp = logprobs(logits[want_lp]) if want_lp else None  # [b, V], of the raw distribution
        self._constrain(logits, rows)
        tokens = sample(logits, [r.req.params for r in rows], [r.generator for r in rows],
                        self._counts[first:], self._seen[first:], self.stats)
        self.observer.sampled(rows)  # before any event: an answer never arrives ahead of its own counts
        finished: set[int] = set()
        for i, row in enumerate(rows):
            token = int(tokens[i])
            try:  # a row's own trouble (its grammar, its text) ends that row only
                self._counts[first + i, token] += 1
                self._seen[first + i, token] = True
                row.output_ids.append(token)
                entry: dict[str, Any] = {"id": token}
                if lp is not None and i in want_lp:
                    lrow = lp[want_lp.index(i)]
                    entry["logprob"] = float(lrow[token])
                    if k := row.req.top_logprobs or 0:
                        top = torch.topk(lrow, k)
                        entry["top"] = [(int(t), float(v)) for v, t in zip(top.values, top.indices, strict=True)]
                if row.matcher is not None and not row.matcher.accept_token(token):
                    raise RuntimeError(f"the grammar refused token {token}")
                if self._advance(row, entry):
                    finished.add(first + i)
            except Exception as exc:
                log.exception("a row failed; the others go on")
                self._emit(row.req, DoneEvent("error", len(row.output_ids), error=str(exc)))
                finished.add(first + i)
        gone = finished | {j for j, r in enumerate(self._rows) if r.req.cancelled}
        if gone:
            self._retire(gone)

    def _advance(self, row: _Row, entry: dict[str, Any]) -> bool:
        """Detokenise, apply stop strings and limits, emit the new text. True when the row is done."""
        req = row.req
        eos = entry["id"] in self.lm.eos_token_ids
        if eos:
            row.output_ids.pop()  # the end-of-turn token is not part of the answer
            stopped = row.text.add(-1, final=True)
            finish: str | None = "stop"
        else:
            stopped = row.text.add(entry["id"])
            if row.open is not None:
                row.open.feed(self.lm.tokenizer.decode([entry["id"]]))
            finish = "stop" if stopped else None
        if finish is None and (len(row.output_ids) >= req.max_tokens or row.position + 1 >= self.lm.context_length):
            # An answer that completes its grammar on its last allowed token ended as asked, not cut off.
            finish = "stop" if row.matcher is not None and row.matcher.is_completed() else "length"
            row.text.add(-1, final=True)
        self._emit(req, TokenEvent(row.text.release(finish is not None), [] if eos else [entry]))
        if finish is not None:
            self._emit(req, DoneEvent(finish, len(row.output_ids) + (1 if eos else 0)))
            return True
        return False

    def _retire(self, gone: set[int]) -> None:
        keep = [i for i in range(len(self._rows)) if i not in gone]
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.lm.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[index]
        # Columns that are padding for every remaining row can go: T shrinks back as old rows leave.
        start = int((mask.sum(0) > 0).nonzero()[0]) if bool((mask.sum(0) > 0).any()) else 0
        self._mask = mask[:, start:]
        self._kv = self._kv.select(index, start) if self._kv is not None else None
        self._counts, self._seen = self._counts[index], self._seen[index]

    def _reset_batch(self) -> None:
        self._rows, self._kv = [], None
        self._mask = self._mask[:0, :0]
        self._counts, self._seen = self._counts[:0], self._seen[:0]

    @staticmethod
    def _emit(req: GenRequest, event: TokenEvent | PromptEvent | DoneEvent) -> None:
        if req.loop is not None and req.events is not None:
            with contextlib.suppress(RuntimeError):  # the event loop closed: the worker is shutting down
                req.loop.call_soon_threadsafe(req.events.put_nowait, event)


def _left_pad_2d(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing <= 0 else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
