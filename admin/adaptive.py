"""`temperature.adaptive`: every RELAY_ADAPTIVE_EVERY_S, each gateway process looks at the policies that opted
in and takes at most one step per policy where the insights of the policy's own default temperatures support it
(admin.insights.adaptive_step), through the service layer (audited, version-checked: with several processes a
step is taken once)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI
from sqlalchemy import Engine
from sqlmodel import Session

from admin import service
from admin.insights import WINDOW_DAYS, adaptive_step, cells_by_task, read
from relay.policy import PolicyInfo

log = logging.getLogger("admin.adaptive")


def adapt_once(engine: Engine, policies: list[PolicyInfo]) -> list[dict]:
    """The steps taken now (their evidence), over the enabled policies of the catalog's snapshot."""
    taken = []
    for policy in policies:
        rule = policy.rules.temperature
        if rule is None or rule.adaptive is None:
            continue
        task = rule.adaptive.task
        try:
            with Session(engine) as s:
                # Only answers at the policy's own default: the temperatures a tenant picks (and the retries the
                # policy makes after a failure) inform the report an operator reads, not the relay's own steps.
                cells = cells_by_task(read(s, policy.id, WINDOW_DAYS, task=task, source="default")).get(task, {})
                step = adaptive_step(rule, cells)
                if step is not None and service.adapt_temperature(s, policy.id, policy.version, task, *step):
                    log.warning("policy %s: by_task.%s %s -> %s (adaptive; evidence %s)", policy.id, task,
                                step[1]["from"], step[0], step[1]["seen"])
                    taken.append({"policy_id": policy.id, **step[1]})
        except Exception as exc:  # one policy's trouble must not stop the others' steps
            log.warning("adaptive step of policy %s failed: %s", policy.id, str(exc).splitlines()[0][:300])
    return taken


async def adapt(app: FastAPI) -> None:
    """One round, off the event loop; the catalog reloads (and nudges the other processes) after a step."""
    if await asyncio.to_thread(adapt_once, app.state.engine, app.state.catalog.snapshot.policies):
        await asyncio.to_thread(app.state.config_sync.changed)
