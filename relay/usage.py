"""Request logs and token usage, written to the database in batches off the request path.

Quota checks read `used()`: the database's count at the last flush plus what this process has
served since. Cross-process enforcement through Redis arrives with the rate-limit issue."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from sqlalchemy import Engine, insert, update
from sqlmodel import Session, select

from relay.models import ApiKey, RequestLog, Tenant, utcnow

log = logging.getLogger("relay.usage")

MAX_PENDING = 100_000  # beyond this the oldest logs are dropped rather than exhausting memory


class UsageRecorder:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._logs: list[dict[str, Any]] = []
        self._tenant_delta: dict[int, int] = defaultdict(int)
        self._key_delta: dict[int, int] = defaultdict(int)
        self._tenant_used: dict[int, int] = {}
        self._key_used: dict[int, int] = {}
        self._lock = asyncio.Lock()

    def record(self, entry: dict[str, Any]) -> None:
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
        return self._tenant_used.get(tenant_id, 0) + self._tenant_delta.get(tenant_id, 0)

    def key_used(self, key_id: int) -> int:
        return self._key_used.get(key_id, 0) + self._key_delta.get(key_id, 0)

    async def flush(self) -> int:
        async with self._lock:
            logs, self._logs = self._logs, []
            tenant_delta, self._tenant_delta = self._tenant_delta, defaultdict(int)
            key_delta, self._key_delta = self._key_delta, defaultdict(int)
            try:
                await asyncio.to_thread(self._write, logs, tenant_delta, key_delta)
            except Exception as exc:
                # Put everything back so nothing is lost; the next flush retries.
                log.warning("usage flush of %d logs failed, will retry: %s", len(logs),
                            str(exc).splitlines()[0][:300])
                self._logs[:0] = logs
                for k, v in tenant_delta.items():
                    self._tenant_delta[k] += v
                for k, v in key_delta.items():
                    self._key_delta[k] += v
                return 0
            return len(logs)

    def _write(self, logs: list[dict[str, Any]], tenant_delta: dict[int, int],
               key_delta: dict[int, int]) -> None:
        now = utcnow()
        with Session(self.engine) as s:
            if logs:
                s.execute(insert(RequestLog), logs)
            for tid, n in tenant_delta.items():
                s.execute(update(Tenant).where(Tenant.id == tid).values(used_tokens=Tenant.used_tokens + n))
            for kid, n in key_delta.items():
                s.execute(update(ApiKey).where(ApiKey.id == kid)
                          .values(used_tokens=ApiKey.used_tokens + n, last_used_at=now))
            s.commit()
            # Fresh totals, including what other gateway processes have written.
            self._tenant_used = dict(s.exec(select(Tenant.id, Tenant.used_tokens)
                                            .where(Tenant.token_quota.is_not(None))).all())
            self._key_used = dict(s.exec(select(ApiKey.id, ApiKey.used_tokens)
                                         .where(ApiKey.token_quota.is_not(None))).all())

    async def flush_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.flush()
