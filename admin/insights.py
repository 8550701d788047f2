"""GET /admin/policies/{id}/insights — what a policy's answers turned out like per model, task and temperature
(relay.insights collects them), and, where the data supports it, which default temperature to set.

A recommendation needs evidence on both sides: the task's current temperature judged on at least `min_sample`
JSON answers, and the temperature recommended instead judged on as many and meeting the target. The adaptive
steps (admin.adaptive) follow the same rule one step at a time, on the answers at the policy's own defaults
only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import func, select
from sqlmodel import Session

from admin.crud import get_or_404, where_given
from admin.deps import RowId, db_session, require_admin
from relay.insights import GREEDY, TASKS, UNSET, bucket, temperature_of
from relay.models import INSIGHT_SUMS, AuditEvent, ModelPolicy, policy_insights, utcnow
from relay.policy_rules import Rules, TemperatureRule, with_task_default

router = APIRouter(prefix="/admin/policies", tags=["policies"])

MIN_SAMPLE = 200  # judged answers a temperature needs before it counts as evidence
TARGET = 0.99
WINDOW_DAYS = 7


@dataclass
class Cell:
    """The sums of one temperature bucket (for a task, over the window and the chosen models)."""

    requests: int = 0
    errors: int = 0
    json_checked: int = 0
    json_valid: int = 0
    finish_length: int = 0
    retries: int = 0

    def add(self, row: Any) -> None:
        for name in INSIGHT_SUMS:
            setattr(self, name, getattr(self, name) + int(getattr(row, name)))

    @property
    def validity(self) -> float | None:
        return self.json_valid / self.json_checked if self.json_checked else None

    def meets(self, target: float, min_sample: int) -> bool | None:
        """True/False when judged on at least min_sample answers; None: not enough evidence."""
        if self.json_checked < min_sample:
            return None
        return self.json_valid >= target * self.json_checked


def read(s: Session, policy_id: int, days: int, *, task: str | None = None, model: str | None = None,
         source: str | None = None) -> list[Any]:
    """The window's sums per (model, task, source, bucket)."""
    t = policy_insights.c
    keys = (t.model, t.task, t.source, t.bucket)
    query = (select(*keys, *(func.sum(t[name]).label(name) for name in INSIGHT_SUMS))
             .where(t.policy_id == policy_id, t.start >= utcnow() - timedelta(days=days))
             .group_by(*keys).order_by(*keys))
    return list(s.execute(where_given(query, ((t.task, task), (t.model, model), (t.source, source)))).all())


def cells_by_task(rows: list[Any]) -> dict[str, dict[int, Cell]]:
    """Summed over models: a policy's defaults apply to every model it matches."""
    tasks: dict[str, dict[int, Cell]] = {}
    for row in rows:
        tasks.setdefault(row.task, {}).setdefault(row.bucket, Cell()).add(row)
    return tasks


def _at(cells: dict[int, Cell], temperature: float) -> Cell:
    """The sums of the bucket this temperature falls in (empty when nothing was seen there)."""
    return cells.get(bucket({"temperature": temperature}), Cell())


def _said(cell: Cell, temperature: float) -> str:
    return f"{cell.validity * 100:.1f}% valid at {temperature:g} over {cell.json_checked:,} requests"


def _floor(rule: TemperatureRule) -> float:
    """The coolest default a step may set: a default below greedy_below would reach the upstream as it is
    (a default is not made greedy), which is what greedy_below exists to prevent."""
    return max(rule.min or 0.0, rule.greedy_below or 0.0)


def _candidates(rule: TemperatureRule, cells: dict[int, Cell]) -> list[tuple[float, Cell]]:
    """Sampled temperatures (not greedy, not unset) a default could be set to, warmest first."""
    found = [(temperature_of(b), c) for b, c in cells.items() if b not in (UNSET, GREEDY)]
    return sorted(((t, c) for t, c in found if t is not None and _floor(rule) <= t and rule.contains(t)),
                  key=lambda tc: -tc[0])


def recommend(task: str, rule: TemperatureRule | None, cells: dict[int, Cell], target: float,
              min_sample: int) -> tuple[float | None, str]:
    """(the temperature to set, or None) and why, in words."""
    rule = rule or TemperatureRule()
    current = rule.task_default(task)
    best = next((t for t, c in _candidates(rule, cells) if c.meets(target, min_sample)), None)
    if current is None:
        if best is None:
            return None, f"{task}: no default temperature is set and no temperature has {min_sample:,} judged " \
                         f"answers meeting {target:.1%}"
        return best, f"{task}: {_said(_at(cells, best), best)} — set by_task.{task} to {best:g}"
    here = _at(cells, current)
    verdict = here.meets(target, min_sample)
    if verdict is None:
        return None, (f"{task}: {here.json_checked:,} judged answers at the current {current:g}; "
                      f"{min_sample:,} are needed before recommending anything")
    moved = best is not None and bucket({"temperature": best}) != bucket({"temperature": current})
    if best is not None and moved and (not verdict or best > current):
        return best, f"{task}: {_said(here, current)}, {_said(_at(cells, best), best)} — set by_task.{task} to {best:g}"
    if verdict:
        return None, f"{task}: {_said(here, current)}, meeting {target:.1%} — keep by_task.{task} at {current:g}"
    return None, (f"{task}: {_said(here, current)}, below {target:.1%}; no other temperature within the rule's "
                  f"bounds has {min_sample:,} judged answers meeting it yet")


def adaptive_step(rule: TemperatureRule, cells: dict[int, Cell]) -> tuple[float, dict[str, Any]] | None:
    """The next step of temperature.adaptive, with its evidence, or None: down by `step` when the current
    temperature falls short of the target on min_sample answers (not below the floor), up by `step` when the
    current one meets it and the warmer one has met it on as many (not above max)."""
    a = rule.adaptive
    assert a is not None
    current = rule.task_default(a.task)
    assert current is not None  # the schema requires a starting point
    here = _at(cells, current)
    verdict = here.meets(a.target_validity, a.min_sample)
    if verdict is False:
        to = max(round(current - a.step, 4), _floor(rule))
        if to >= current or not rule.contains(to):  # at (or, set by hand, below) the floor already
            return None
        seen = [(current, here)]
    elif verdict:
        to = round(current + a.step, 4)
        there = _at(cells, to)
        if not rule.contains(to) or to > 2 or not there.meets(a.target_validity, a.min_sample):
            return None
        seen = [(current, here), (to, there)]
    else:
        return None
    return to, {"task": a.task, "from": current, "to": to, "target_validity": a.target_validity,
                "min_sample": a.min_sample,
                "seen": [{"temperature": t, "json_checked": c.json_checked, "json_valid": c.json_valid}
                         for t, c in seen]}


def _row(row: Any) -> dict[str, Any]:
    cell = Cell()
    cell.add(row)
    return {"model": row.model, "task": row.task, "source": row.source, "temperature": temperature_of(row.bucket),
            "greedy": row.bucket == GREEDY, **{name: getattr(cell, name) for name in INSIGHT_SUMS},
            "error_rate": round(cell.errors / cell.requests, 4) if cell.requests else None,
            "json_validity": None if cell.validity is None else round(cell.validity, 4),
            "length_rate": round(cell.finish_length / cell.requests, 4) if cell.requests else None}


@router.get("/{policy_id}/insights")
def insights(policy_id: RowId, days: int = Query(WINDOW_DAYS, ge=1, le=30),
             min_sample: int | None = Query(None, ge=1, le=1_000_000),
             target: float | None = Query(None, gt=0, le=1), model: str | None = Query(None, max_length=200),
             s: Session = Depends(db_session), _: str = Depends(require_admin)) -> dict[str, Any]:
    policy = get_or_404(s, ModelPolicy, policy_id, "policy")
    try:
        rule = Rules.model_validate(policy.rules).temperature
    except ValueError:  # rules written around the admin API (the catalog ignores such a policy): a table only
        rule = None
    adaptive = rule.adaptive if rule else None
    rows = read(s, policy_id, days, model=model)
    tasks = []
    for task, cells in sorted(cells_by_task(rows).items()):
        same = adaptive is not None and adaptive.task == task  # the adaptive rule's own bar, unless asked
        want = target if target is not None else (adaptive.target_validity if same else TARGET)
        need = min_sample if min_sample is not None else (adaptive.min_sample if same else MIN_SAMPLE)
        value, why = recommend(task, rule, cells, want, need)
        if not any(c.json_checked for c in cells.values()):
            value, why = None, f"{task}: no JSON answers were judged; nothing to recommend on"
        elif task not in TASKS:
            value, why = None, f"{task}: requests under task names the rules do not know; no by_task to set"
        suggested = with_task_default(policy.rules, task, value) if value is not None else None
        tasks.append({"task": task, "current": rule.task_default(task) if rule else None,
                      "target_validity": want, "min_sample": need, "recommendation": value, "reason": why,
                      "rules": suggested,  # PATCH /admin/policies/{id} with {"rules": …} applies it
                      "errors": _error_notes(cells, need)})
    steps = s.execute(select(AuditEvent).where(AuditEvent.entity == "policy", AuditEvent.entity_id == policy_id,
                                            AuditEvent.action == "adapt")
                   .order_by(AuditEvent.id.desc()).limit(20)).scalars().all()
    return {"policy": f"{policy.id}@{policy.version}", "window_days": days, "rows": [_row(r) for r in rows],
            "tasks": tasks, "adaptive": adaptive.model_dump() if adaptive else None,
            "adaptive_steps": [{"at": e.created_at, **((e.after or {}).get("evidence") or {})} for e in steps]}


def _error_notes(cells: dict[int, Cell], min_sample: int) -> list[str]:
    """Temperatures where the upstream itself fails: a floor the channel probe can confirm."""
    notes = []
    for b, cell in sorted(cells.items()):
        if cell.requests >= min_sample and cell.errors >= 0.05 * cell.requests:
            where = "with no temperature" if b == UNSET else "greedy" if b == GREEDY else f"at {temperature_of(b):g}"
            notes.append(f"{cell.errors / cell.requests:.1%} of {cell.requests:,} requests {where} failed; "
                         "POST /admin/channels/{id}/probe finds the temperatures a channel refuses")
    return notes
