"""Request logs and token usage, written to the database in batches off the request path.

The totals (`tenant_used`, `key_used`) are the database's count at the last flush plus what this process has
served since: relay.quota uses them as the floor of its shared counters. If the database is away, logs and
totals wait in memory and are written when it returns."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import Engine, insert, update
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from relay import insights
from relay.models import ApiKey, RequestLog, Tenant, utcnow
from relay.rollup import add_stats, prune_minutes

log = logging.getLogger("relay.usage")

MAX_PENDING = 100_000  # beyond this the oldest logs are dropped rather than exhausting memory
PRUNE_EVERY_S = 3600.0  # per-minute stats older than relay.rollup.MINUTES_KEPT go, once an hour
MAX_TOKENS = 2**31 - 1  # the log columns are INTEGER; beyond this an upstream reports nonsense
_STRING_LIMITS = {"endpoint": 50, "model": 200, "upstream_model": 200, "error_type": 100, "cache": 10, "policy": 50,
                  "request_id": 128}


def clamp_tokens(value: object) -> int:
    try:
        return min(max(int(value), 0), MAX_TOKENS)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return 0


def _storable(entry: dict[str, Any]) -> dict[str, Any]:
    """Client- and upstream-supplied values must fit the columns: one bad row must never block the batch."""
    for column, limit in _STRING_LIMITS.items():
        value = entry.get(column)
        if isinstance(value, str):
            entry[column] = value.replace("\x00", "")[:limit]
    for column in ("prompt_tokens", "completion_tokens", "total_tokens"):
        entry[column] = clamp_tokens(entry.get(column, 0))
    return entry


class UsageRecorder:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._logs: list[dict[str, Any]] = []
        self._tenant_delta: dict[int, int] = defaultdict(int)
        self._key_delta: dict[int, int] = defaultdict(int)
        self._tenant_used: dict[int, int] = {}
        self._key_used: dict[int, int] = {}
        # Deltas being written right now: still counted until the refreshed totals include them.
        self._inflight_tenant: dict[int, int] = {}
        self._inflight_key: dict[int, int] = {}
        self._lock = asyncio.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        entry = _storable(entry)
        entry.setdefault("created_at", utcnow())
        if len(self._logs) >= MAX_PENDING:
            del self._logs[0]
        self._logs.append(entry)
        tokens = entry.get("total_tokens") or 0
        if entry.get("tenant_id") is not None:
            self._tenant_delta[entry["tenant_id"]] += tokens
        if entry.get("key_id") is not None:
            self._key_delta[entry["key_id"]] += tokens

    def tenant_used(self, tenant_id: int) -> int:
        return (self._tenant_used.get(tenant_id, 0) + self._inflight_tenant.get(tenant_id, 0)
                + self._tenant_delta.get(tenant_id, 0))

    def key_used(self, key_id: int) -> int:
        return self._key_used.get(key_id, 0) + self._inflight_key.get(key_id, 0) + self._key_delta.get(key_id, 0)

    async def flush(self) -> int:
        async with self._lock:
            logs, self._logs = self._logs, []
            tenant_delta, self._tenant_delta = self._tenant_delta, defaultdict(int)
            key_delta, self._key_delta = self._key_delta, defaultdict(int)
            self._inflight_tenant, self._inflight_key = tenant_delta, key_delta
            try:
                if logs:
                    await insights.judge(logs)  # JSON answers the insights count, judged here off the request path
                    await asyncio.to_thread(self._insert_logs, logs)
            except Exception as exc:
                self._logs[:0] = logs  # the database is away: keep them for the next flush
                self._restore(tenant_delta, key_delta)
                log.warning("usage flush of %d logs failed, will retry: %s", len(logs),
                            str(exc).splitlines()[0][:300])
                return 0
            try:
                await asyncio.to_thread(self._apply_usage, tenant_delta, key_delta)
            except Exception as exc:
                self._restore(tenant_delta, key_delta)  # logs are in; only the totals are retried
                log.warning("usage totals update failed, will retry: %s", str(exc).splitlines()[0][:300])
                return len(logs)
            try:
                await asyncio.to_thread(self._refresh_totals)
            except Exception as exc:  # the totals are written: only the copy held here is stale for now
                log.warning("reading usage totals failed: %s", str(exc).splitlines()[0][:300])
            return len(logs)

    def _restore(self, tenant_delta: dict[int, int], key_delta: dict[int, int]) -> None:
        self._inflight_tenant, self._inflight_key = {}, {}
        for k, v in tenant_delta.items():
            self._tenant_delta[k] += v
        for k, v in key_delta.items():
            self._key_delta[k] += v

    def _apply_usage(self, tenant_delta: dict[int, int], key_delta: dict[int, int]) -> None:
        now = utcnow()
        with Session(self.engine) as s:
            for tid, n in tenant_delta.items():
                s.execute(update(Tenant).where(Tenant.id == tid).values(used_tokens=Tenant.used_tokens + n))
            for kid, n in key_delta.items():
                s.execute(update(ApiKey).where(ApiKey.id == kid)
                          .values(used_tokens=ApiKey.used_tokens + n, last_used_at=now))
            s.commit()

    def _refresh_totals(self) -> None:
        """Fresh totals, including what other gateway processes have written (and this one's last deltas,
        which stop counting separately once they are in)."""
        with Session(self.engine) as s:
            self._tenant_used = dict(s.exec(select(Tenant.id, Tenant.used_tokens)
                                            .where(Tenant.token_quota.is_not(None))).all())
            self._key_used = dict(s.exec(select(ApiKey.id, ApiKey.used_tokens)
                                         .where(ApiKey.token_quota.is_not(None))).all())
        self._inflight_tenant, self._inflight_key = {}, {}

    def _insert_logs(self, logs: list[dict[str, Any]]) -> None:
        """One batch insert; if the batch fails, row by row, dropping (and reporting) only the rows the
        database refuses, so a single bad row cannot hold back every log and usage total behind it. Rows written
        leave `logs`: if the database goes away halfway, only the rest is retried (none is written twice)."""
        try:
            with Session(self.engine) as s:
                _write(s, logs)
                s.commit()
            return
        except OperationalError:
            raise  # the database is unreachable: keep everything and retry later
        except Exception as exc:
            log.warning("batch of %d logs refused (%s); writing them one by one", len(logs), type(exc).__name__)
        for i, entry in enumerate(logs):
            try:
                with Session(self.engine) as s:
                    _write(s, [entry])
                    s.commit()
            except OperationalError:
                del logs[:i]  # written or dropped already: the caller keeps only this entry on for the next flush
                raise
            except Exception as exc:
                log.error("dropped a request log the database refuses: %s", str(exc).splitlines()[0][:300])

    async def flush_forever(self, interval_s: float) -> None:
        pruned_at = 0.0
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()
            if time.monotonic() - pruned_at > PRUNE_EVERY_S:
                pruned_at = time.monotonic()
                try:
                    await asyncio.to_thread(self._prune_stats)
                except Exception as exc:  # the next hour tries again; nothing depends on it meanwhile
                    log.warning("pruning old per-minute stats failed: %s", str(exc).splitlines()[0][:300])

    def _prune_stats(self) -> None:
        with self.engine.begin() as conn:
            prune_minutes(conn, utcnow())
            insights.prune(conn, utcnow())


def _write(s: Session, logs: list[dict[str, Any]]) -> None:
    """The log rows, and in the same transaction what they add to the dashboard's stats and the policy
    insights (so the three never disagree, and a retried batch never counts twice)."""
    s.execute(insert(RequestLog), [{k: v for k, v in entry.items() if k != "insight"} for entry in logs])
    add_stats(s.connection(), logs)
    insights.add_insights(s.connection(), logs)
