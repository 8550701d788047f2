"""/admin/logs: the request log, newest first, filtered and paged by cursor (an id, never an offset, so a page
costs the same at row 10 and at row 1,000,000 and new rows do not shift the pages being read); the totals of
the same filtered range; and the same rows as CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import Engine, Select, case, func
from sqlmodel import Session, select

from admin.deps import FilterId, JSONLimitedRoute, db_session, require_admin
from admin.schemas import TextFilter, UtcDateTime
from relay.errors import bad_request
from relay.models import RequestLog

router = APIRouter(prefix="/admin", tags=["logs"], route_class=JSONLimitedRoute)

CSV_MAX_ROWS = 100_000  # one export; narrow the filters for more
_CSV_BATCH = 2_000
_CSV_COLUMNS = ("id", "created_at", "tenant_id", "key_id", "endpoint", "model", "upstream_model", "channel_id",
                "stream", "status_code", "error_type", "prompt_tokens", "completion_tokens", "total_tokens",
                "latency_ms", "cache", "policy", "rewrites", "request_id")

Status = Annotated[str | None, Query(pattern=r"^([1-5]xx|[1-5][0-9][0-9]|error)$")]
Cache = Annotated[str | None, Query(pattern=r"^(hit|miss|bypass)$")]
Cursor = Annotated[str | None, Query(max_length=20, pattern=r"^[0-9]+$")]


@dataclass
class LogFilter:
    """The filters every view of the log shares (query parameters of the same names)."""

    tenant_id: FilterId = None
    key_id: FilterId = None
    channel_id: FilterId = None
    model: TextFilter = None
    status: Status = None  # 2xx | 4xx | 5xx | error (≥ 400) | an exact code
    cache: Cache = None
    rewritten: bool | None = None
    request_id: TextFilter = None  # X-Request-Id (indexed)
    since: UtcDateTime | None = None
    until: UtcDateTime | None = None

    def apply(self, query: Select) -> Select:
        col = RequestLog
        for name in ("tenant_id", "key_id", "channel_id", "model", "cache", "request_id"):
            value = getattr(self, name)
            if value is not None:
                query = query.where(getattr(col, name) == value)
        if self.status == "error":
            query = query.where(col.status_code >= 400)
        elif self.status and self.status.endswith("xx"):
            low = int(self.status[0]) * 100
            query = query.where(col.status_code >= low, col.status_code < low + 100)
        elif self.status:
            query = query.where(col.status_code == int(self.status))
        if self.rewritten is not None:
            # rewrites is JSON null when nothing was rewritten (an empty list is stored as null too)
            query = query.where(col.rewrites.is_not(None) if self.rewritten else col.rewrites.is_(None))
        if self.since is not None:
            query = query.where(col.created_at >= self.since)
        if self.until is not None:
            query = query.where(col.created_at < self.until)
        return query


def log_page(s: Session, filters: LogFilter, limit: int, cursor: str | None) -> dict[str, Any]:
    """Rows older than the cursor, newest first; `next_cursor` is null on the last page."""
    query = filters.apply(select(RequestLog)).order_by(RequestLog.id.desc()).limit(limit + 1)
    if cursor is not None:
        if int(cursor) > 2**62:
            raise bad_request("cursor is out of range.", "cursor")
        query = query.where(RequestLog.id < int(cursor))
    rows = list(s.exec(query).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return {"object": "list", "data": [row.model_dump(mode="json") for row in rows],
            "next_cursor": str(rows[-1].id) if more else None}


def log_totals(s: Session, filters: LogFilter) -> dict[str, Any]:
    c = RequestLog
    query = filters.apply(select(
        func.count(), func.sum(case((c.status_code >= 400, 1), else_=0)), func.sum(c.prompt_tokens),
        func.sum(c.completion_tokens), func.sum(c.total_tokens), func.sum(case((c.cache == "hit", 1), else_=0)),
        func.sum(case((c.cache == "miss", 1), else_=0))))
    n, errors, prompt, completion, total, hits, misses = s.exec(query).one()
    return {"requests": int(n or 0), "errors": int(errors or 0), "prompt_tokens": int(prompt or 0),
            "completion_tokens": int(completion or 0), "total_tokens": int(total or 0),
            "cache_hits": int(hits or 0), "cache_misses": int(misses or 0)}


@router.get("/logs")
def logs(filters: LogFilter = Depends(), limit: int = Query(100, ge=1, le=1000), cursor: Cursor = None,
         s: Session = Depends(db_session), _: str = Depends(require_admin)) -> dict:
    return log_page(s, filters, limit, cursor)


@router.get("/logs/summary")
def logs_summary(filters: LogFilter = Depends(), s: Session = Depends(db_session),
                 _: str = Depends(require_admin)) -> dict:
    """Usage totals of the filtered range (the same filters as /admin/logs)."""
    return log_totals(s, filters)


_FORMULA_STARTS = frozenset("=+-@\t\r\n＝＋－＠")


def _csv_cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        value = json.dumps(value, separators=(",", ":"))
    # A cell a spreadsheet would run as a formula (a model name is the client's text) is quoted as text; some
    # spreadsheets skip leading blanks, and full-width signs count in some locales.
    if isinstance(value, str) and value and (value[0] in _FORMULA_STARTS or value.lstrip()[:1] in _FORMULA_STARTS):
        value = "'" + value
    return value


@router.get("/logs.csv")
def logs_csv(request: Request, filters: LogFilter = Depends(), _: str = Depends(require_admin)) -> StreamingResponse:
    """The filtered rows as CSV, newest first, at most CSV_MAX_ROWS, read in batches by id."""
    def rows() -> Iterator[str]:
        yield from _csv_rows(request.app.state.engine, filters)

    return StreamingResponse(rows(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": 'attachment; filename="requests.csv"'})


def _csv_rows(engine: Engine, filters: LogFilter) -> Iterator[str]:
    """A short session per batch (the response outlives the request's dependencies, and a slow reader must
    not hold a transaction open for the whole download)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_CSV_COLUMNS)
    sent, before = 0, None
    while sent < CSV_MAX_ROWS:
        query = filters.apply(select(RequestLog)).order_by(RequestLog.id.desc())
        if before is not None:
            query = query.where(RequestLog.id < before)
        with Session(engine) as db:
            batch = list(db.exec(query.limit(min(_CSV_BATCH, CSV_MAX_ROWS - sent))).all())
        for row in batch:
            data = row.model_dump(mode="json")
            writer.writerow([_csv_cell(data[c]) for c in _CSV_COLUMNS])
        yield out.getvalue()
        out.seek(0)
        out.truncate()
        if len(batch) < _CSV_BATCH:
            break
        sent += len(batch)
        before = batch[-1].id
