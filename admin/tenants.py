"""/admin/tenants"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from sqlmodel import Session, select

from admin import service
from admin.crud import Paging, get_or_404
from admin.deps import JSONLimitedRoute, RowId, announce, db_session, require_admin
from admin.schemas import TenantCreate, TenantOut, TenantUpdate
from relay.models import Tenant

router = APIRouter(prefix="/admin/tenants", tags=["tenants"], route_class=JSONLimitedRoute)


@router.post("", status_code=201, response_model=TenantOut)
def create_tenant(body: TenantCreate, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> Tenant:
    tenant = service.create_tenant(s, body, actor)
    announce(request)
    return tenant


@router.get("", response_model=list[TenantOut])
def list_tenants(request: Request, response: Response, status: Literal["active", "disabled"] | None = None,
                 paging: Paging = Depends(), s: Session = Depends(db_session),
                 _: str = Depends(require_admin)) -> list[Tenant]:
    """`?status=&q=` (q: in the name), paged (admin.crud.Paging)."""
    return paging.rows(s, select(Tenant), Tenant, Tenant.name, request, response, ((Tenant.status, status),))


@router.get("/{tenant_id}", response_model=TenantOut)
def get_tenant(tenant_id: RowId, s: Session = Depends(db_session), _: str = Depends(require_admin)) -> Tenant:
    return get_or_404(s, Tenant, tenant_id, "tenant")


@router.patch("/{tenant_id}", response_model=TenantOut)
def update_tenant(tenant_id: RowId, body: TenantUpdate, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> Tenant:
    tenant = service.update_tenant(s, tenant_id, body, actor)
    announce(request)
    return tenant


@router.delete("/{tenant_id}", status_code=204)
def delete_tenant(tenant_id: RowId, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> None:
    """Deletes the tenant with its keys and policies; request logs keep their history."""
    service.delete_tenant(s, tenant_id, actor)
    announce(request)
