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

    def shared(self, prompts: list[list[int]]) -> tuple[int, ...]:
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

    def cached(self, prompt: list[int]) -> int:
        """Tokens at the start of this prompt whose KV is cached (its longest cached prefix, leaving one)."""
        return max((len(key) for key in self._prefixes if len(key) < len(prompt) and tuple(prompt[:len(key)]) == key),
                   default=0)

    def kv(self, prefix: tuple[int, ...]) -> KVCache:
        """KV of a prefix (one row), computed alone and kept (LRU) for later prefills."""
        if prefix not in self._prefixes:
            self._prefixes[prefix] = self._forward(list(prefix))
            while sum(map(len, self._prefixes)) > MAX_CACHED_PREFIX_TOKENS and len(self._prefixes) > 1:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(prefix)
        return self._prefixes[prefix]

