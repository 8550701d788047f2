"""CRUD helpers shared by the admin routers: fetch-or-404, save with audit, conflict handling."""

from __future__ import annotations

import re
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fastapi import Request
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel

from relay.errors import RelayError, not_found
from relay.models import AuditEvent, utcnow

Row = TypeVar("Row", bound=SQLModel)

# Secrets never appear in admin answers or audit events.
_SECRET_FIELDS = {"api_key", "key_hash"}
_SECRET_WORDS = re.compile(r"key|secret|token|password|credential|auth|cookie", re.I)


def redact_options(options: Any) -> Any:
    """Channel options may carry provider credentials at any depth (aws_secret_access_key,
    extra_headers.Authorization, ...)."""
    if isinstance(options, dict):
        return {k: ("***" if _SECRET_WORDS.search(str(k)) else redact_options(v)) for k, v in options.items()}
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    return options


def redact_url(url: str | None) -> str | None:
    """https://user:password@host/... → https://user:***@host/..."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def get_or_404(session: Session, model: type[Row], row_id: int, entity: str) -> Row:
    row = session.get(model, row_id)
    if row is None:
        raise not_found(f"No {entity} with id {row_id}.", "id", f"{entity}_not_found")
    return row


def snapshot_row(row: SQLModel | None) -> dict[str, Any] | None:
    if row is None:
        return None
    data = row.model_dump(mode="json")
    if "options" in data:
        data["options"] = redact_options(data["options"])
    if "base_url" in data:
        data["base_url"] = redact_url(data["base_url"])
    return {k: ("***" if k in _SECRET_FIELDS and v is not None else v) for k, v in data.items()}


def commit(session: Session, request: Request, *, action: str, entity: str, row: SQLModel | None,
           before: dict[str, Any] | None, actor: str) -> None:
    """Commit the pending change together with its audit event, then refresh this process's
    in-memory configuration so the change applies to the very next request."""
    if row is not None and action != "delete":
        if hasattr(row, "updated_at"):
            row.updated_at = utcnow()
        session.add(row)
    try:
        session.flush()
        session.add(AuditEvent(actor=actor, action=action, entity=entity, entity_id=getattr(row, "id", None),
                               before=before, after=snapshot_row(row) if action != "delete" else None))
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise RelayError(409, f"This {entity} conflicts with an existing one (names must be unique).",
                         "invalid_request_error", "name", "conflict") from exc
    if row is not None and action != "delete":
        session.refresh(row)
    request.app.state.catalog.reload()


def apply_patch(row: SQLModel, changes: dict[str, Any]) -> None:
    for field, value in changes.items():
        setattr(row, field, value)
