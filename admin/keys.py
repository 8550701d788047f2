"""/admin/keys — the secret is returned once, by POST; only its SHA-256 is stored."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Request, Response
from sqlmodel import Session, select

from admin import bulk, service
from admin.crud import Paging, get_or_404
from admin.deps import FilterId, JSONLimitedRoute, RowId, announce, db_session, require_admin
from admin.schemas import KeyBatch, KeyCreate, KeyCreated, KeyOut, KeysCreated, KeyUpdate
from relay.models import ApiKey

router = APIRouter(prefix="/admin/keys", tags=["keys"], route_class=JSONLimitedRoute)


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, request: Request, s: Session = Depends(db_session),
               actor: str = Depends(require_admin)) -> KeyCreated:
    key, secret = service.create_key(s, body, actor)
    announce(request)
    return KeyCreated(**KeyOut.model_validate(key).model_dump(), key=secret)


@router.post("/batch", status_code=201, response_model=KeysCreated)
def create_keys(body: KeyBatch, request: Request, s: Session = Depends(db_session),
                actor: str = Depends(require_admin)) -> KeysCreated:
    made = bulk.create_keys(s, body, actor)
    announce(request)
    return KeysCreated(data=[KeyCreated(**KeyOut.model_validate(key).model_dump(), key=secret)
                             for key, secret in made])


@router.get("", response_model=list[KeyOut])
def list_keys(request: Request, response: Response, tenant_id: FilterId = None,
              status: Literal["active", "revoked"] | None = None, paging: Paging = Depends(),
              s: Session = Depends(db_session), _: str = Depends(require_admin)) -> list[ApiKey]:
    """`?tenant_id=&status=&q=` (q: in the name or the shown prefix), paged (admin.crud.Paging)."""
    return paging.rows(s, select(ApiKey), ApiKey, ApiKey.name + " " + ApiKey.prefix, request, response,
                       ((ApiKey.tenant_id, tenant_id), (ApiKey.status, status)))


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
