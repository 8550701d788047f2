"""The worker's bounded waiting queue (`--max-waiting`): a generation request is admitted only while the sequences
it asks for (prompts × n) fit beside those already admitted, that is `max_batch` running plus `max_waiting`
waiting; beyond that it is refused at once with a 503 `overloaded` and a Retry-After estimated from the measured
tokens/s. The check runs right after the body is parsed (before the prompt is rendered or tokenised) and the
count is taken in the same synchronous step, so a burst on the event loop cannot all pass one check; a sequence
holds its place until it finishes (or fails, or its client leaves). An idle worker takes any one request, however
many sequences it asks for: a request that could never fit is not refused forever."""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from backends.wire import errors as wire
from backends.wire.errors import APIError

DEFAULT_TOKENS_PER_SEQUENCE = 128.0  # what a sequence is expected to generate before any has finished
FALLBACK_RETRY_S = 2.0  # nothing sampled lately: no rate to estimate from
MIN_RETRY_S, MAX_RETRY_S = 1.0, 60.0
RATE_WINDOW_S = 5.0


def default_max_waiting(max_batch: int) -> int:
    return 4 * max_batch


def sequences(body: dict[str, Any]) -> int:
    """Engine sequences a parsed chat or completions body asks for, before tokenising: prompts × n."""
    prompt = body.get("prompt")  # completions: a string, token ids, or a list of either
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return prompts * (body.get("n") or 1)


def retry_after_s(excess: int, tokens_per_sequence: float, tokens_per_s: float | None) -> float:
    """Seconds until `excess` more sequences have finished, so that the refused request would fit: the batch
    finishes sequences at tokens_per_s / tokens_per_sequence a second. Clamped to [1, 60] s; without a measured
    rate, FALLBACK_RETRY_S."""
    if not tokens_per_s or tokens_per_s <= 0:
        return FALLBACK_RETRY_S
    return min(MAX_RETRY_S, max(MIN_RETRY_S, excess * tokens_per_sequence / tokens_per_s))


def retry_headers(seconds: float) -> dict[str, str]:
    """The worker's Retry-After headers: `seconds` spread by up to +25%, still at most MAX_RETRY_S."""
    return wire.retry_headers(seconds, spread=0.25, most=MAX_RETRY_S)


def queue_timing(reqs: Iterable[Any]) -> dict[str, str]:
    """`Server-Timing: queue;dur=<ms>`: from entering the engine's queue to the start of its prefill, the longest
    of the request's sequences that have started (timings are set by backends.metrics)."""
    waits = [t.started - t.submitted for r in reqs if (t := r.timing) is not None and t.started]
    return {"Server-Timing": f"queue;dur={max(waits) * 1000:.1f}"} if waits else {}


class TokenRate:
    """Tokens sampled per second over the last RATE_WINDOW_S, in one-second buckets; fed by the engine thread
    (add), read on the event loop (per_second). Times are time.perf_counter()."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._buckets: collections.deque[list[int]] = collections.deque()  # [second, tokens]

    def add(self, tokens: int, now: float | None = None) -> None:
        second = int(time.perf_counter() if now is None else now)
        with self._lock:
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += tokens
            else:
                self._buckets.append([second, tokens])
                self._trim(second)

    def per_second(self, now: float | None = None) -> float | None:
        """None when nothing was sampled within the window."""
        now = time.perf_counter() if now is None else now
        with self._lock:
            self._trim(now)
            if not self._buckets:
                return None
            tokens = sum(count for _, count in self._buckets)
            since = self._buckets[0][0]
        return tokens / max(now - since, 1.0)

    def _trim(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + 1 <= now - self.window_s:
            self._buckets.popleft()


class Admission:
    """Sequences admitted and not yet finished, against max_batch + max_waiting. Event loop only."""

    def __init__(self, max_batch: int, max_waiting: int, rate: TokenRate,
                 on_refused: Callable[[], None] = lambda: None) -> None:
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.rate, self.on_refused = rate, on_refused
        self.admitted = 0
        self.tokens_per_sequence = DEFAULT_TOKENS_PER_SEQUENCE  # a moving mean of finished sequences' tokens
        self._measured = False

    def admit(self, sequences: int) -> Ticket:
        """Takes `sequences` places (no await between the check and the count), or raises the 503."""
        excess = self.admitted + sequences - (self.max_batch + self.max_waiting)
        if self.admitted and excess > 0:
            self.on_refused()
            seconds = retry_after_s(excess, self.tokens_per_sequence, self.rate.per_second())
            waiting = max(0, self.admitted - self.max_batch)
            raise APIError(503, f"This worker is overloaded: its batch is full and its waiting queue too ({waiting} "
                           f"waiting; --max-waiting {self.max_waiting}). Retry in about {math.ceil(seconds)} s, or on "
                           "another worker.", "server_error", None, "overloaded", headers=retry_headers(seconds))
        self.admitted += sequences
        return Ticket(self, sequences)

    def observe(self, completion_tokens: int) -> None:
        if not self._measured:
            self.tokens_per_sequence, self._measured = float(completion_tokens), True
        else:
            self.tokens_per_sequence += 0.1 * (completion_tokens - self.tokens_per_sequence)


class Ticket:
    """One request's places; each is given back once (done per finished sequence, close for all the rest)."""

    __slots__ = ("admission", "held")

    def __init__(self, admission: Admission, held: int) -> None:
        self.admission, self.held = admission, held

    def done(self, completion_tokens: int | None = None) -> None:
        """One sequence finished; its completion tokens (None: it failed) feed the Retry-After estimate."""
        if not self.held:
            return
        self.held -= 1
        self.admission.admitted -= 1
        if completion_tokens is not None:
            self.admission.observe(completion_tokens)

    def close(self) -> None:
        self.admission.admitted -= self.held
        self.held = 0
