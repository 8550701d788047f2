"""The policy stage: matches a model policy and rewrites the request.

Policy matching and rewriting arrive with the policy issue; until then no policy matches and every
request passes through untouched, which is exactly what the pipeline expects from a model without a
policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PolicyOutcome:
    request: dict[str, Any]
    rewrites: list[dict[str, Any]] = field(default_factory=list)
    ref: str | None = None  # "id@version" of the matched policy

    def rewrites_header(self) -> str:
        if not self.rewrites:
            return "none"
        return ";".join(f"{r['param']}:{r['from']}->{r['to']}" for r in self.rewrites)


def apply_policy(endpoint: str, request: dict[str, Any], tenant_id: int) -> PolicyOutcome:
    return PolicyOutcome(request)
