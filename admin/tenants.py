"""/admin/tenants"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlmodel import Session, delete, select

from admin.crud import apply_patch, commit, get_or_404, snapshot_row
from admin.deps import RowId, db_session, require_admin
from admin.schemas import TenantCreate, TenantOut, TenantUpdate
from relay.models import ApiKey, ModelPolicy, Tenant

router = APIRouter(prefix="/admin/tenants", tags=["tenants"])


@router.post("", status_code=201, response_model=TenantOut)
def create_tenant(body: TenantCreate, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> Tenant:
    tenant = Tenant(**body.model_dump())
    commit(s, request, action="create", entity="tenant", row=tenant, before=None, actor=actor)
    return tenant


@router.get("", response_model=list[TenantOut])
def list_tenants(s: Session = Depends(db_session), _: str = Depends(require_admin)) -> list[Tenant]:
    return list(s.exec(select(Tenant).order_by(Tenant.id)).all())


@router.get("/{tenant_id}", response_model=TenantOut)
def get_tenant(tenant_id: RowId, s: Session = Depends(db_session), _: str = Depends(require_admin)) -> Tenant:
    return get_or_404(s, Tenant, tenant_id, "tenant")


@router.patch("/{tenant_id}", response_model=TenantOut)
def update_tenant(tenant_id: RowId, body: TenantUpdate, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> Tenant:
    tenant = get_or_404(s, Tenant, tenant_id, "tenant")
    before = snapshot_row(tenant)
    apply_patch(tenant, body.model_dump(exclude_unset=True))
    commit(s, request, action="update", entity="tenant", row=tenant, before=before, actor=actor)
    return tenant


@router.delete("/{tenant_id}", status_code=204)
def delete_tenant(tenant_id: RowId, request: Request, s: Session = Depends(db_session),
                  actor: str = Depends(require_admin)) -> None:
    """Deletes the tenant with its keys and policies; request logs keep their history."""
    tenant = get_or_404(s, Tenant, tenant_id, "tenant")
    before = snapshot_row(tenant)
    s.exec(delete(ApiKey).where(ApiKey.tenant_id == tenant_id))
    s.exec(delete(ModelPolicy).where(ModelPolicy.tenant_id == tenant_id))
    s.delete(tenant)
    commit(s, request, action="delete", entity="tenant", row=tenant, before=before, actor=actor)
