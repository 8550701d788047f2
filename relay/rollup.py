"""The request log rolled up into request_stats: per minute and per hour, per model, channel and tenant.

Written by the log writer in the same transaction as the rows it sums (so the two never disagree, and a
retried batch is never counted twice), as additive upserts: several gateway processes may add to the same
minute at once."""

from __future__ import annotations

import bisect
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Table, delete
from sqlalchemy.dialects import postgresql, sqlite

from relay.models import LATENCY_COLUMNS, LATENCY_EDGES_MS, STAT_SUMS, request_stats

WIDTHS = (60, 3600)
MINUTES_KEPT = timedelta(days=7)  # per-minute rows older than this are pruned; hourly ones stay
# A request refused before routing for its model (unknown, or not this key's) is counted under this name, not
# the client's string: junk model names must not multiply rows or push real models out of the charts.
UNKNOWN_MODEL = "(unknown model)"
_KEY = ("width", "start", "model", "channel_id", "tenant_id")
_COUNTS = STAT_SUMS + LATENCY_COLUMNS


def latency_bin(latency_ms: float) -> int:
    """The histogram bin of a latency: the first edge it does not exceed. The last bin also holds anything
    slower than its edge (a percentile there reads as that edge, as an open-ended Prometheus bucket would)."""
    return min(bisect.bisect_left(LATENCY_EDGES_MS, latency_ms), len(LATENCY_EDGES_MS) - 1)


def bucket_start(created_at: datetime, width: int) -> datetime:
    aware = created_at if created_at.tzinfo else created_at.replace(tzinfo=UTC)
    return datetime.fromtimestamp(int(aware.timestamp()) // width * width, UTC)


def rollup(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request_stats rows that these log rows add (one per width, bucket, model, channel and tenant)."""
    sums: dict[tuple, list[int]] = defaultdict(lambda: [0] * len(_COUNTS))
    for entry in logs:
        status = int(entry["status_code"])
        cache = entry.get("cache")
        values = (1, int(status >= 400), entry.get("prompt_tokens") or 0, entry.get("completion_tokens") or 0,
                  entry.get("total_tokens") or 0, int(cache == "hit"), int(cache == "miss"))
        latency = len(STAT_SUMS) + latency_bin(float(entry.get("latency_ms") or 0.0))
        refused_model = entry.get("channel_id") is None and status in (403, 404)
        model = UNKNOWN_MODEL if refused_model else str(entry.get("model") or "")[:200]
        for width in WIDTHS:
            key = (width, bucket_start(entry["created_at"], width), model, entry.get("channel_id") or 0,
                   entry.get("tenant_id") or 0)
            row = sums[key]
            for i, value in enumerate(values):
                row[i] += int(value)
            row[latency] += 1
    return [dict(zip(_KEY, key, strict=True)) | dict(zip(_COUNTS, counts, strict=True))
            for key, counts in sums.items()]


def add_stats(conn: Connection, logs: list[dict[str, Any]]) -> None:
    """Adds these log rows to request_stats (in the caller's transaction)."""
    add_up(conn, request_stats, _KEY, _COUNTS, rollup(logs))


def add_up(conn: Connection, table: Table, key: tuple[str, ...], counts: tuple[str, ...],
           rows: list[dict[str, Any]]) -> None:
    """An additive upsert of summed rows: a row whose key exists adds its counts to the stored ones."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=list(key), set_={name: table.c[name] + statement.excluded[name] for name in counts})
    # Sorted by key, so two processes adding to the same rows lock them in the same order (no deadlock).
    conn.execute(statement, sorted(rows, key=lambda r: tuple(r[k] for k in key)))


def prune_minutes(conn: Connection, now: datetime) -> int:
    """Deletes per-minute rows older than MINUTES_KEPT (the hourly ones keep the history)."""
    result = conn.execute(delete(request_stats).where(request_stats.c.width == 60,
                                                      request_stats.c.start < now - MINUTES_KEPT))
    return result.rowcount or 0
