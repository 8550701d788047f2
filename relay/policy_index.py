"""Which policy applies to a (model, tenant), at a cost that does not grow with the number of policies.

Exact model names sit in a dict; a glob sits under its literal prefix (the characters before its first `*`, `?`
or `[`), so a lookup only tries the globs whose prefix the model name starts with — one dict lookup per distinct
prefix length. The answer (a miss too) is memoised per (model, tenant) for the life of the catalog snapshot,
which is rebuilt when the configuration changes; the memo is bounded, since model names come from clients."""

from __future__ import annotations

from relay.policy import PolicyInfo, match

MEMO_MAX = 65_536  # (model, tenant) answers kept; beyond this the memo starts over
_WILD = "*?["


def literal_prefix(pattern: str) -> str | None:
    """The characters before the first wildcard; None for a pattern without one (an exact name)."""
    cut = min((i for i in (pattern.find(ch) for ch in _WILD) if i >= 0), default=None)
    return None if cut is None else pattern[:cut]


class PolicyIndex:
    def __init__(self, policies: list[PolicyInfo]) -> None:
        self.policies = policies
        self._exact: dict[str, list[PolicyInfo]] = {}
        self._globs: dict[int, dict[str, list[PolicyInfo]]] = {}  # prefix length -> prefix -> policies
        for policy in policies:
            prefix = literal_prefix(policy.model_pattern)
            if prefix is None:
                self._exact.setdefault(policy.model_pattern, []).append(policy)
            else:
                self._globs.setdefault(len(prefix), {}).setdefault(prefix, []).append(policy)
        self._lengths = sorted(self._globs)
        self._memo: dict[tuple[str, int | None], PolicyInfo | None] = {}

    def match(self, model: str, tenant_id: int | None) -> PolicyInfo | None:
        """The policy for this model and tenant, by relay.policy.match's order (tenant's first, then priority,
        then the more specific pattern)."""
        key = (model, tenant_id)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = list(self._exact.get(model, ()))
        for length in self._lengths:
            if length > len(model):
                break
            found += self._globs[length].get(model[:length], ())
        best = match(found, model, tenant_id)
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        self._memo[key] = best
        return best
