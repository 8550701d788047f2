"""What a request costs and leaves behind, in one place: before dispatch its admission (token quotas and
rpm/tpm, with its estimate reserved), afterwards its request-log row, its usage totals, the cache statistics
and the settlement of what it reserved."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from channels.base import REQUEST_ID
from relay.auth import Principal
from relay.errors import APIError
from relay.limits import RateLimiter
from relay.metrics import RelayMetrics
from relay.quota import Hold, QuotaLedger
from relay.tokens import output_budget, output_cap, prompt_tokens, text_tokens
from relay.usage import UsageRecorder, clamp_tokens

EMPTY_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def clean_usage(usage: Any) -> dict[str, Any]:
    """The upstream's usage with every count a sane integer (ONE API bills from it)."""
    if not isinstance(usage, dict):
        return dict(EMPTY_USAGE)
    out: dict[str, Any] = {k: clamp_tokens(usage.get(k, 0)) for k in EMPTY_USAGE}
    for key, value in usage.items():
        if key.endswith("_details") and isinstance(value, dict):
            out[key] = {k: clamp_tokens(v) for k, v in value.items() if isinstance(v, int | float)}
    return out


def total_usage(usages: list[dict[str, Any]]) -> dict[str, int]:
    return {k: sum(u[k] for u in usages) for k in EMPTY_USAGE}


def generated_text(chunk: dict[str, Any]) -> list[str]:
    """What a chunk carries that the upstream generated: text, reasoning and tool-call arguments."""
    pieces = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        for piece in (delta.get("content"), delta.get("reasoning_content"), choice.get("text")):
            if isinstance(piece, str) and piece:
                pieces.append(piece)
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            for piece in (function.get("name"), function.get("arguments")):
                if isinstance(piece, str) and piece:
                    pieces.append(piece)
    return pieces


async def unreported_usage(entry: Entry, endpoint: str, request: dict[str, Any], body_bytes: int,
                           sent: list[str]) -> dict[str, int]:
    """A stream that ended without the upstream's usage (cut off, or an upstream that never reports it): the
    upstream read the whole prompt and produced what was sent, so that is the bill."""
    admission = entry.admission
    prompt = admission.prompt_tokens if admission is not None else None
    if prompt is None:
        prompt = await prompt_tokens(endpoint, request, body_bytes)
    completion = await text_tokens("".join(sent), request.get("model"))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Admission:
    """What an admitted request holds until it is over."""

    estimate: int = 0  # tokens reserved against quotas and tpm
    prompt_tokens: int | None = None  # the relay's own count, when it made one
    hold: Hold | None = None
    tpm: bool = False
    # The reservation assumed this max_tokens, which the request did not name: it must be sent with it, or the
    # answer could outgrow what was reserved.
    cap: int | None = None


@dataclass
class Entry:
    """The request-log row of one request, filled in as the request goes."""

    principal: Principal
    endpoint: str
    model: str
    stream: bool
    started: float
    admission: Admission | None = None
    channel_id: int | None = None
    upstream_model: str | None = None
    cache: str = "bypass"  # hit | miss | bypass
    policy: str | None = None
    rewrites: list[dict[str, Any]] | None = None
    observations: list[Any] = field(default_factory=list)  # relay.insights.Observation per upstream answer
    insight: dict[str, Any] | None = None  # summed into policy_insights by the log writer


class Accounting:
    def __init__(self, usage: UsageRecorder, limits: RateLimiter, quota: QuotaLedger, cache_stats: Any,
                 output_estimate: int, metrics: RelayMetrics | None = None) -> None:
        self.usage = usage
        self.metrics = metrics or RelayMetrics(lambda model: False, lambda channel_id: "none")
        self.limits = limits
        self.quota = quota
        self.cache_stats = cache_stats  # Counter of hit/miss/bypass, flushed by the cache
        self.output_estimate = output_estimate
        self._background: set[asyncio.Task] = set()

    async def admit(self, principal: Principal, endpoint: str, request: dict[str, Any], body_bytes: int,
                    calls: int = 1) -> Admission:
        """Reserves the request's estimate (for `calls` upstream calls, as a JSON retry may make) against its
        quotas, then rpm/tpm; 429 when either is exhausted."""
        tpm = self.limits.applies_to_tokens(principal)
        admission = Admission(tpm=tpm)
        if tpm or self.quota.applies(principal):
            admission.prompt_tokens = await prompt_tokens(endpoint, request, body_bytes)
            per_choice = 0 if endpoint == "embeddings" else output_cap(request)  # an embedding generates nothing
            if per_choice is None:
                per_choice = admission.cap = self.output_estimate
            admission.estimate = (admission.prompt_tokens + output_budget(request, per_choice)) * calls
        admission.hold = await self.quota.reserve(principal, admission.estimate)
        try:
            await self.limits.admit(principal, admission.estimate if tpm else 0)
        except APIError:
            await self.quota.settle(admission.hold, 0)
            raise
        return admission

    def finish(self, entry: Entry, status: int, usage: dict[str, Any] | None = None,
               error_type: str | None = None) -> float:
        """Writes the log row (batched), counts the tokens, settles the reservations; the latency in ms."""
        latency_ms = (time.perf_counter() - entry.started) * 1000
        usage = usage or EMPTY_USAGE
        if status == 200:
            self.cache_stats[entry.cache] += 1
        tokens = int(usage.get("total_tokens") or 0)  # a cut-off stream still spent what it streamed
        self.usage.record({
            "tenant_id": entry.principal.tenant.id, "key_id": entry.principal.key.id, "endpoint": entry.endpoint,
            "model": entry.model, "upstream_model": entry.upstream_model, "channel_id": entry.channel_id,
            "stream": entry.stream, "status_code": status, "error_type": error_type,
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0), "total_tokens": tokens,
            "latency_ms": round(latency_ms, 3), "cache": entry.cache, "policy": entry.policy,
            "rewrites": entry.rewrites or None, "request_id": REQUEST_ID.get(), "insight": entry.insight,
        })
        self.metrics.finished(entry, status, usage, error_type, latency_ms / 1000)
        admission = entry.admission
        if admission is not None and (admission.hold is not None or admission.tpm):
            entry.admission = None  # settled once, whatever calls finish again
            self.quota.spending(admission.hold, tokens)  # now in the usage totals, not yet in Redis
            self._later(self._settle(entry.principal, admission, tokens))
        return latency_ms

    async def _settle(self, principal: Principal, admission: Admission, spent: int) -> None:
        await self.quota.settle(admission.hold, spent)
        if admission.tpm:
            await self.limits.settle_tokens(principal, spent - admission.estimate)

    def _later(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)
