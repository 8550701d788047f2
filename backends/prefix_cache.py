"""Prompts that arrive together often share a start (the chat template's system part): its KV is computed
once, kept in a small LRU cache bounded by tokens, and only the rest of each prompt runs batched."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from backends.kv_cache import KVCache

MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth its own forward
MAX_CACHED_PREFIX_TOKENS = 8192  # bounds the cache's memory (KV of this many tokens, all entries)


class PrefixCache:
    def __init__(self, forward: Callable[[list[int]], KVCache]) -> None:
        self._forward = forward  # KV of one sequence computed alone
        self._prefixes: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self.tokens = 0  # cached prefixes' tokens, kept as an int: metrics read it from another thread

    def shared(self, prompts: list[list[int]]) -> tuple[int, ...]:
        """The longest cached start of every prompt, or, for several prompts, their longest common prefix when it
        is long enough to be worth a separate forward. A cached prefix serves any start of it too (its first
        columns are that start's KV), so a burst whose prompts share less than an earlier one did needs no new
        forward. Always leaves each prompt one own token."""
        limit = min(len(p) for p in prompts) - 1
        common = 0
        while common < limit and all(p[common] == prompts[0][common] for p in prompts):
            common += 1
        head = tuple(prompts[0][:common])
        best = self._longest_cached(head)
        if best >= MIN_SHARED_PREFIX and (len(prompts) == 1 or common - best < MIN_SHARED_PREFIX):
            return head[:best]
        worth = len(prompts) > 1 and MIN_SHARED_PREFIX <= common <= MAX_CACHED_PREFIX_TOKENS // 4
        return head if worth else ()

    def cached(self, prompt: list[int]) -> int:
        """Tokens at the start of this prompt whose KV is cached (leaving it one own token)."""
        best = self._longest_cached(tuple(prompt[:len(prompt) - 1]))
        return best if best >= MIN_SHARED_PREFIX else 0

    def _longest_cached(self, head: tuple[int, ...]) -> int:
        """How far `head` runs along the cached prefix it shares most with."""
        return max((_common_length(key, head) for key in self._prefixes), default=0)

    def kv(self, prefix: tuple[int, ...]) -> KVCache:
        """KV of a prefix (one row): the first columns of a cached prefix that starts with it, else computed alone;
        kept (LRU, bounded by tokens) for later prefills."""
        if prefix not in self._prefixes:
            source = next((key for key in self._prefixes if key[:len(prefix)] == prefix), None)
            self._prefixes[prefix] = (self._prefixes[source].head(len(prefix)) if source is not None
                                      else self._forward(list(prefix)))
            self.tokens += len(prefix)
            while self.tokens > MAX_CACHED_PREFIX_TOKENS and len(self._prefixes) > 1:
                self.tokens -= len(self._prefixes.popitem(last=False)[0])
        self._prefixes.move_to_end(prefix)
        return self._prefixes[prefix]


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared at C speed
        return n
    return next(i for i in range(n) if a[i] != b[i])
