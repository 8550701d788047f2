"""/admin/usage and /admin/audit — read-only totals over request logs, and the audit events."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlalchemy import case, func
from sqlmodel import Session, select

from admin.deps import FilterId, JSONLimitedRoute, db_session, require_admin
from admin.logs import Cursor
from admin.schemas import TextFilter, UtcDateTime
from relay.errors import bad_request
from relay.models import AuditEvent, RequestLog

router = APIRouter(prefix="/admin", tags=["usage"], route_class=JSONLimitedRoute)


@router.get("/usage")
def usage(since: UtcDateTime | None = None, until: UtcDateTime | None = None, tenant_id: FilterId = None,
          model: TextFilter = None, s: Session = Depends(db_session), _: str = Depends(require_admin)) -> dict:
    """Totals grouped by tenant, model and channel over an optional time window."""
    cols = (RequestLog.tenant_id, RequestLog.model, RequestLog.channel_id)
    query = select(*cols, func.count(), func.sum(RequestLog.prompt_tokens),
                   func.sum(RequestLog.completion_tokens), func.sum(RequestLog.total_tokens),
                   func.sum(case((RequestLog.status_code >= 400, 1), else_=0)),
                   func.avg(RequestLog.latency_ms)).group_by(*cols).order_by(*cols)
    if since is not None:
        query = query.where(RequestLog.created_at >= since)
    if until is not None:
        query = query.where(RequestLog.created_at < until)
    if tenant_id is not None:
        query = query.where(RequestLog.tenant_id == tenant_id)
    if model is not None:
        query = query.where(RequestLog.model == model)
    rows = [{"tenant_id": t, "model": m, "channel_id": c, "requests": n, "prompt_tokens": int(p or 0),
             "completion_tokens": int(ct or 0), "total_tokens": int(tt or 0), "errors": int(e or 0),
             "avg_latency_ms": round(float(lat or 0), 3)}
            for t, m, c, n, p, ct, tt, e, lat in s.exec(query).all()]
    return {"object": "list", "data": rows}


@router.get("/audit")
def audit(limit: int = Query(100, ge=1, le=1000), cursor: Cursor = None, entity: TextFilter = None,
          entity_id: FilterId = None, action: TextFilter = None, s: Session = Depends(db_session),
          _: str = Depends(require_admin)) -> dict:
    """Admin changes, newest first, paged by cursor like /admin/logs."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit + 1)
    for column, value in (("entity", entity), ("entity_id", entity_id), ("action", action)):
        if value is not None:
            query = query.where(getattr(AuditEvent, column) == value)
    if cursor is not None:
        if int(cursor) > 2**62:
            raise bad_request("cursor is out of range.", "cursor")
        query = query.where(AuditEvent.id < int(cursor))
    rows = list(s.exec(query).all())
    page = rows[:limit]
    return {"object": "list", "data": [row.model_dump(mode="json") for row in page],
            "next_cursor": str(page[-1].id) if len(rows) > limit else None}
