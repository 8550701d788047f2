"""/admin/cache — statistics of the response cache, and purging by model, tenant or all."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from admin import service
from admin.deps import FilterId, JSONLimitedRoute, db_session, require_admin
from admin.schemas import TextFilter

router = APIRouter(prefix="/admin/cache", tags=["cache"], route_class=JSONLimitedRoute)


@router.get("")
async def cache_stats(request: Request, _: str = Depends(require_admin)) -> dict[str, Any]:
    """Hits, misses and bypasses counted by every gateway process, Redis errors, and stored entries."""
    return await request.app.state.cache.summary()


@router.delete("")
async def purge(request: Request, model: TextFilter = None, tenant_id: FilterId = None,
                s: Session = Depends(db_session), actor: str = Depends(require_admin)) -> dict[str, Any]:
    """Without a filter, everything; `model` or `tenant_id` purge only that model's or tenant's entries."""
    removed = await request.app.state.cache.purge(model=model, tenant_id=tenant_id)
    await run_in_threadpool(service.record_cache_purge, s, {"model": model, "tenant_id": tenant_id}, removed,
                            actor)
    return {"purged": removed}
