"""/admin/keys — the secret is returned once, by POST; only its SHA-256 is stored."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from sqlmodel import Session, select

from admin.crud import apply_patch, commit, get_or_404, snapshot_row
from admin.deps import FilterId, RowId, db_session, require_admin
from admin.schemas import KeyCreate, KeyCreated, KeyOut, KeyUpdate
from relay.auth import hash_secret, new_secret, shown_prefix
from relay.errors import not_found
from relay.models import ApiKey, Tenant

router = APIRouter(prefix="/admin/keys", tags=["keys"])


def create_key_row(s: Session, body: KeyCreate) -> tuple[ApiKey, str]:
    if s.get(Tenant, body.tenant_id) is None:
        raise not_found(f"No tenant with id {body.tenant_id}.", "tenant_id", "tenant_not_found")
    secret = new_secret()
    key = ApiKey(**body.model_dump(), prefix=shown_prefix(secret), key_hash=hash_secret(secret))
    return key, secret


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, request: Request, s: Session = Depends(db_session),
               actor: str = Depends(require_admin)) -> KeyCreated:
    key, secret = create_key_row(s, body)
    commit(s, request, action="create", entity="api_key", row=key, before=None, actor=actor)
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
    key = get_or_404(s, ApiKey, key_id, "api_key")
    before = snapshot_row(key)
    apply_patch(key, body.model_dump(exclude_unset=True))
    commit(s, request, action="update", entity="api_key", row=key, before=before, actor=actor)
    return key


@router.delete("/{key_id}", response_model=KeyOut)
def revoke_key(key_id: RowId, request: Request, s: Session = Depends(db_session),
               actor: str = Depends(require_admin)) -> ApiKey:
    """Revokes (the row stays, so usage history still names the key)."""
    key = get_or_404(s, ApiKey, key_id, "api_key")
    before = snapshot_row(key)
    key.status = "revoked"
    commit(s, request, action="revoke", entity="api_key", row=key, before=before, actor=actor)
    return key
