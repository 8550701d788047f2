"""Read helpers shared by the admin routers and the service layer: fetch-or-404, and the redacted view of a
row that answers and audit events show (secrets never appear in either)."""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from sqlmodel import Session, SQLModel

from relay.errors import not_found
from relay.secrets import SECRET_WORDS

Row = TypeVar("Row", bound=SQLModel)

_SECRET_FIELDS = {"api_key", "key_hash"}


def redact_options(options: Any) -> Any:
    """Channel options may carry provider credentials at any depth (aws_secret_access_key,
    extra_headers.Authorization, ...)."""
    if isinstance(options, dict):
        return {k: ("***" if SECRET_WORDS.search(str(k)) else redact_options(v)) for k, v in options.items()}
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
