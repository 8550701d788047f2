"""Channel order for one request: the highest priority tier first, weighted random order inside a tier. The
pipeline walks this list (retrying a channel `retries` times, then failing over); relay.circuit takes out the
channels that are cooling down."""

from __future__ import annotations

import random
from itertools import groupby

from channels.base import Channel


def weighted_order(channels: list[Channel], rng: random.Random) -> list[Channel]:
    """Weighted sampling without replacement (Efraimidis–Spirakis: sort by u^(1/w))."""
    keyed = [(rng.random() ** (1.0 / max(c.config.weight, 1e-9)) if c.config.weight > 0 else -1.0, c)
             for c in channels]
    keyed.sort(key=lambda kc: kc[0], reverse=True)
    return [c for _, c in keyed]


_rng = random.Random()


def candidates(channels: list[Channel], rng: random.Random = _rng) -> list[Channel]:
    if len(channels) <= 1:
        return list(channels)
    by_priority = sorted(channels, key=lambda c: c.config.priority, reverse=True)
    ordered: list[Channel] = []
    for _, tier in groupby(by_priority, key=lambda c: c.config.priority):
        ordered.extend(weighted_order(list(tier), rng))
    return ordered
