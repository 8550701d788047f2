"""/admin/stats: the request log in time buckets per model, channel or tenant, for the dashboard's charts,
read from the request_stats rollup (relay.rollup) so a day of a million requests costs a few thousand rows;
/admin/circuits: the channels cooling down right now.

Latency percentiles come from the rollup's histogram (as Prometheus' histogram_quantile estimates them), so
buckets and groups merge by addition."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import accumulate
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import case, func, select
from sqlmodel import Session

from admin.deps import JSONLimitedRoute, db_session, require_admin
from admin.schemas import UtcDateTime
from relay.errors import bad_request
from relay.models import LATENCY_COLUMNS, LATENCY_EDGES_MS, STAT_SUMS, request_stats

router = APIRouter(prefix="/admin", tags=["stats"], route_class=JSONLimitedRoute)

BUCKET_SECONDS = {"1m": 60, "1h": 3600}
DEFAULT_SPAN = {"1m": timedelta(hours=1), "1h": timedelta(days=1)}
MAX_BUCKETS = 1500
TOP_GROUPS = 10  # the busiest groups get their own series; the rest are summed as "other"
OTHER = "other"  # the group of everything outside the busiest


def quantile(q: float, cumulative: list[int], total: int) -> float | None:
    """The q-quantile from cumulative counts at LATENCY_EDGES_MS, interpolated linearly inside its bucket."""
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for edge, count in zip(LATENCY_EDGES_MS, cumulative, strict=True):
        if count >= rank:
            inside = count - below
            return round(lower + (edge - lower) * ((rank - below) / inside if inside else 1.0), 3)
        lower, below = edge, count
    return float(LATENCY_EDGES_MS[-1])  # not reached: the cumulative count ends at the total


def _window(since: datetime | None, until: datetime | None, bucket: str) -> tuple[datetime, datetime]:
    width = BUCKET_SECONDS[bucket]
    until = until or datetime.now(UTC)
    try:
        since = since or until - DEFAULT_SPAN[bucket]
    except OverflowError:  # an `until` in year 1 has no hour before it
        raise bad_request("until is out of range.", "until") from None
    if since >= until:
        raise bad_request("since must be before until.", "since")
    if (until - since).total_seconds() / width > MAX_BUCKETS:
        raise bad_request(f"At most {MAX_BUCKETS} buckets: use a shorter range or bucket=1h.", "since")
    start = datetime.fromtimestamp(since.timestamp() // width * width, UTC)  # aligned to the bucket
    return start, until


@router.get("/stats")
def stats(request: Request, since: UtcDateTime | None = None, until: UtcDateTime | None = None,
          bucket: Annotated[Literal["1m", "1h"], Query()] = "1m",
          group_by: Annotated[Literal["model", "channel", "tenant"], Query()] = "model",
          s: Session = Depends(db_session), _: str = Depends(require_admin)) -> dict:
    """Buckets aligned to the minute or hour: the first starts at or before `since`, the last holds `until`."""
    start, until = _window(since, until, bucket)
    width = BUCKET_SECONDS[bucket]
    t = request_stats.c
    group = {"model": t.model, "channel": t.channel_id, "tenant": t.tenant_id}[group_by]  # 0: no channel/tenant
    in_range = (t.width == width, t.start >= start, t.start < until)

    busiest = s.execute(select(group).where(*in_range).group_by(group)
                        .order_by(func.sum(t.requests).desc(), group).limit(TOP_GROUPS + 1)).scalars().all()
    top = list(busiest[:TOP_GROUPS])
    # NULL stands for "the rest" (no group key is NULL)
    label = case((group.in_(top), group), else_=None) if len(busiest) > TOP_GROUPS else group
    counts = STAT_SUMS + LATENCY_COLUMNS
    rows = s.execute(select(t.start, label.label("grp"), *(func.sum(t[name]) for name in counts))
                     .where(*in_range).group_by(t.start, label)).all()

    first = int(start.timestamp()) // width
    n_buckets = int(until.timestamp()) // width - first + 1
    series: dict[Any, dict[str, list]] = {}
    bins: dict[Any, list[list[int]]] = {}
    for row in rows:
        at = row[0] if row[0].tzinfo else row[0].replace(tzinfo=UTC)
        index = int(at.timestamp()) // width - first
        entry = series.setdefault(row[1], {name: [0] * n_buckets for name in STAT_SUMS})
        for name, value in zip(STAT_SUMS, row[2:], strict=False):
            entry[name][index] += int(value or 0)
        # one row per (bucket, group) from the GROUP BY: this bucket's histogram is set once
        bins.setdefault(row[1], [[0] * len(LATENCY_COLUMNS) for _ in range(n_buckets)])[index] = \
            [int(v or 0) for v in row[2 + len(STAT_SUMS):]]

    names = _labels(request, group_by)
    out, total_bins = [], [0] * len(LATENCY_COLUMNS)
    totals = {name: 0 for name in STAT_SUMS}
    for key in sorted(series, key=lambda k: -sum(series[k]["requests"])):
        entry = series[key]
        entry["p50_ms"] = [quantile(0.5, list(accumulate(b)), n) for b, n in zip(bins[key], entry["requests"],
                                                                                   strict=True)]
        entry["p99_ms"] = [quantile(0.99, list(accumulate(b)), n) for b, n in zip(bins[key], entry["requests"],
                                                                                   strict=True)]
        group_name = OTHER if key is None else str(key)
        shown = OTHER if key is None else ("none" if key == 0 else names.get(key, group_name))
        out.append({"group": group_name, "label": shown, "rest": key is None, **entry})  # rest: not a real group
        for name in STAT_SUMS:
            totals[name] += sum(entry[name])
        for b in bins[key]:
            total_bins = [x + y for x, y in zip(total_bins, b, strict=True)]
    judged = totals["cache_hits"] + totals["cache_misses"]
    cumulative = list(accumulate(total_bins))
    totals.update(error_rate=round(totals["errors"] / totals["requests"], 4) if totals["requests"] else None,
                  cache_hit_ratio=round(totals["cache_hits"] / judged, 4) if judged else None,
                  p50_ms=quantile(0.5, cumulative, totals["requests"]),
                  p99_ms=quantile(0.99, cumulative, totals["requests"]))
    return {"bucket": bucket, "group_by": group_by, "since": start.isoformat(), "until": until.isoformat(),
            "buckets": [(first + i) * width for i in range(n_buckets)], "series": out, "totals": totals}


def _labels(request: Request, group_by: str) -> dict[Any, str]:
    snapshot = request.app.state.catalog.snapshot
    if group_by == "channel":
        return {cid: ch.config.name for cid, ch in snapshot.channels.items()}
    if group_by == "tenant":
        return {tid: t.name for tid, t in snapshot.tenants.items()}
    return {}


@router.get("/circuits")
async def circuits(request: Request, _: str = Depends(require_admin)) -> dict:
    """Channels whose circuit is open (cooling down after repeated failures) in every gateway process."""
    channels = request.app.state.catalog.snapshot.channels
    cooling = await request.app.state.pipeline.dispatch.breaker.cooling(sorted(channels))
    if cooling is None:
        return {"object": "list", "data": [], "redis": "unavailable"}
    return {"object": "list", "data": [{"channel_id": cid, "name": channels[cid].config.name,
                                        "cooling_s": round(left, 1)} for cid, left in sorted(cooling.items())]}
