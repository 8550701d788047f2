"""/admin/keys — the secret is returned once, by POST; only its SHA-256 is stored."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlmodel import Session, select

from admin import service
from admin.crud import get_or_404
from admin.deps import FilterId, JSONLimitedRoute, RowId, announce, db_session, require_admin
from admin.schemas import KeyCreate, KeyCreated, KeyOut, KeyUpdate
from relay.models import ApiKey

router = APIRouter(prefix="/admin/keys", tags=["keys"], route_class=JSONLimitedRoute)


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, request: Request, s: Session = Depends(db_session),
               actor: str = Depends(require_admin)) -> KeyCreated:
    key, secret = service.create_key(s, body, actor)
    announce(request)
    return KeyCreated(**KeyOut.model_validate(key).model_dump(), key=secret)


@router.get("", response_model=list[KeyOut])
def list_keys(tenant_id: FilterId = None, s: Session = Depends(db_session),
              _: str = Depends(require_admin)) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.id)
    if tenant_id is not None:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return list(s.exec(query).all())


@router.get("/{key_id}", response_model=KeyOut)
def get_key(key_id: RowId, s: Session = Depends(db_session), _: str = Depends(require_admin)) -> ApiKey:
    return get_or_404(s, ApiKey, key_id, "api_key")


@router.patch("/{key_id}", response_model=KeyOut)
def update_key(key_id: RowId, body: KeyUpdate, request: Request, s: Session = Depends(db_session),
               actor: str = Depends(require_admin)) -> ApiKey:
    key = service.update_key(s, key_id, body, actor)
    announce(request)
    return key


@router.delete("/{key_id}", response_model=KeyOut)
def revoke_key(key_id: RowId, request: Request, s: Session = Depends(db_session),
               actor: str = Depends(require_admin)) -> ApiKey:
    """Revokes (the row stays, so usage history still names the key)."""
    key = service.revoke_key(s, key_id, actor)
    announce(request)
    return key
