"""Policy insights, the collecting half: what each upstream answer under a policy turned out like (an error, JSON
that parses and follows its schema or not, cut off at max_tokens), at the temperature it was sampled with.

The pipeline notes an Observation per upstream answer on the request's log entry; JSON answers are judged by
the log writer before it writes them (never on the request path), which sums them per (policy, model, task,
temperature source, bucket, hour) into policy_insights in the same transaction as the log rows (so a retried
batch never counts twice), as additive upserts like relay.rollup. The admin side reads them
(admin.insights) and may act on them (admin.adaptive). Every key part is bounded: the model reached a channel
(so it is in the catalog), the task is one of the policy schema's tasks or `other`, the source one of three,
the bucket one of 42."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, get_args

from sqlalchemy import Connection, delete

from relay.json_check import judge_in_time, response_schema
from relay.models import INSIGHT_SUMS, policy_insights
from relay.policy import PolicyOutcome, Try, asks_for_json, is_greedy
from relay.policy_rules import Task
from relay.rollup import add_up, bucket_start

if TYPE_CHECKING:
    from relay.accounting import Entry

TASKS = frozenset(get_args(Task))
UNSET = -1  # no temperature sent: the upstream's own default
GREEDY = 0
HOUR = 3600
DAYS_KEPT = timedelta(days=30)
JUDGED_CHARS = 64 * 1024  # a longer JSON answer is not judged (its text would wait in memory for the log writer)
JUDGE_BUDGET_S = 0.25  # per schema check at flush; one that takes longer is left unjudged
FLUSH_BUDGET_S = 1.0  # schema checks per flush; answers beyond it are left unjudged
_KEY = ("policy_id", "model", "task", "source", "bucket", "start")


def bucket(request: dict[str, Any]) -> int:
    """The temperature a request was sampled with, in hundredths rounded to 0.05 (so a client's 0.4371 joins 0.45,
    and at most 42 buckets exist); greedy requests (top_k 1 included) are 0."""
    if is_greedy(request):
        return GREEDY
    t = request.get("temperature")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        return UNSET
    return min(max(round(t * 20) * 5, 0), 200)


def temperature_of(bucket_value: int) -> float | None:
    return None if bucket_value == UNSET else bucket_value / 100


def source(outcome: PolicyOutcome) -> str:
    """Who chose the temperature: the policy's default (or by_task), a JSON retry, or the client (a value it
    sent, clamped or not). Only `default` answers move an adaptive default: a tenant picks its own temperatures,
    so what it sees at them is no evidence the relay acts on by itself."""
    rule = next((r["rule"] for r in reversed(outcome.rewrites) if r["param"] == "temperature"), "")
    if rule.startswith("json_retry"):
        return "retry"
    return "default" if rule == "temperature.default" or rule.startswith("temperature.by_task") else "client"


@dataclass(slots=True)
class Observation:
    """One upstream answer (or failure)."""

    bucket: int
    source: str = "client"
    error: bool = False
    json_valid: bool | None = None  # None: JSON was not asked for, or the answer could not be judged
    finish_length: bool = False
    retries: int = 0  # JSON retries this answer's request went on to take (on its first answer only)
    # (text, schema) to judge when the log is written: a schema check never delays an answer
    pending: tuple[str, Any] | None = None

    def judge_later(self, text: str | None, schema: Any) -> None:
        """An answer cut at max_tokens, or too long, is not judged (a tenant's max_tokens=1 proves nothing); one
        with no text (a tool call) neither."""
        if text is not None and not self.finish_length and len(text) <= JUDGED_CHARS:
            self.pending = (text, schema)


def _first_text(response: dict[str, Any]) -> str | None:
    """The first choice's text (chat or completions); None for a tool call or no text."""
    choices = response.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message")
    if isinstance(message, dict):
        text = None if message.get("tool_calls") else message.get("content")
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else None


def _cut_off(response: dict[str, Any]) -> bool:
    choices = response.get("choices")
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") == "length"
                                             for c in choices)


def note(observations: list[Observation], tried: Try) -> None:
    """One try of a request (its outcome, answer and, when a JSON retry judged it, that verdict): every try after
    the first counts as a retry of the first."""
    outcome, answer, verdict = tried
    request = outcome.request
    seen = Observation(bucket(request), source(outcome), finish_length=_cut_off(answer))
    if asks_for_json(request):
        if verdict is not None and not seen.finish_length:
            seen.json_valid = verdict
        elif verdict is None:
            seen.judge_later(_first_text(answer), response_schema(request))
    observations.append(seen)
    if len(observations) > 1:
        observations[0].retries += 1


def noter(outcome: PolicyOutcome, observations: list[Observation]) -> Callable[[Try], None]:
    """Where each try's answer is noted for the policy's insights (nowhere when no policy matched)."""
    return partial(note, observations) if outcome.ref is not None else lambda _: None


class StreamWatch:
    """What a stream's chunks say about its answer: the first choice's text (only when JSON was asked for) and
    whether any choice was cut off at max_tokens."""

    __slots__ = ("outcome", "text", "size", "length")

    def __init__(self, outcome: PolicyOutcome) -> None:
        self.outcome = outcome
        self.text: list[str] | None = [] if asks_for_json(outcome.request) else None
        self.size = 0
        self.length = False

    def add(self, chunk: dict[str, Any]) -> None:
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason") == "length":
                self.length = True
            if self.text is not None and not choice.get("index"):
                delta = choice.get("delta")
                piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(delta, dict) and delta.get("tool_calls"):
                    self.text = None  # a tool call: no text to judge
                elif isinstance(piece, str) and self.size <= JUDGED_CHARS:
                    self.text.append(piece)
                    self.size += len(piece)

    def observation(self) -> Observation:
        request = self.outcome.request
        seen = Observation(bucket(request), source(self.outcome), finish_length=self.length)
        if self.text is not None:
            seen.judge_later("".join(self.text), response_schema(request))
        return seen


async def judge(logs: list[dict[str, Any]]) -> None:
    """Judges the JSON answers these log entries hold, before they are written: each within JUDGE_BUDGET_S, all
    within FLUSH_BUDGET_S (the rest stay unjudged), and every text is let go."""
    deadline = time.monotonic() + FLUSH_BUDGET_S
    for entry in logs:
        found = entry.get("insight")
        for seen in found["observations"] if found else ():
            if seen.pending is not None:
                (text, schema), seen.pending = seen.pending, None
                if time.monotonic() < deadline:
                    seen.json_valid = await judge_in_time(text, schema, JUDGE_BUDGET_S)


def insight(outcome: PolicyOutcome, entry: Entry, status: int, error_type: str | None) -> dict[str, Any] | None:
    """The insight part of a finished request's log entry: None unless a policy matched and a channel was asked
    (a cache hit is no new evidence; a request refused before any channel says nothing about sampling)."""
    if outcome.ref is None or outcome.task in (None, "embeddings") or entry.channel_id is None or entry.cache == "hit":
        return None
    seen = list(entry.observations)
    # The upstream refused the request (its 400, passed on) or failed on it with a 5xx (Qwen1.5's inf/nan crash);
    # not a timeout, an unreachable or busy upstream, refused credentials or a relay-side error.
    if status == 400 or (status == 502 and error_type == "upstream_error"):
        seen.append(Observation(bucket(outcome.request), source(outcome), error=True))
    if not seen:
        return None
    return {"policy_id": int(outcome.ref.split("@")[0]), "model": entry.model[:200],
            "task": outcome.task if outcome.task in TASKS else "other", "observations": seen}


def rollup(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The policy_insights rows these log entries add."""
    sums: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(INSIGHT_SUMS))
    for entry in logs:
        found = entry.get("insight")
        if not found:
            continue
        start = bucket_start(entry["created_at"], HOUR)
        for seen in found["observations"]:
            row = sums[(found["policy_id"], found["model"], found["task"], seen.source, seen.bucket, start)]
            row[0] += 1
            row[1] += int(seen.error)
            row[2] += int(seen.json_valid is not None)
            row[3] += int(seen.json_valid is True)
            row[4] += int(seen.finish_length)
            row[5] += seen.retries
    return [dict(zip(_KEY, key, strict=True)) | dict(zip(INSIGHT_SUMS, counts, strict=True))
            for key, counts in sums.items()]


def add_insights(conn: Connection, logs: list[dict[str, Any]]) -> None:
    """Adds these log entries' observations to policy_insights (in the caller's transaction)."""
    add_up(conn, policy_insights, _KEY, INSIGHT_SUMS, rollup(logs))


def prune(conn: Connection, now: datetime) -> int:
    result = conn.execute(delete(policy_insights).where(policy_insights.c.start < now - DAYS_KEPT))
    return result.rowcount or 0
