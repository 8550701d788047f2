"""Read helpers shared by the admin routers and the service layer: fetch-or-404, the redacted view of a row that
answers and audit events show (secrets never appear in either), and the paging of admin lists."""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fastapi import Query, Request, Response
from sqlalchemy import func
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


def where_given(query: Any, filters: tuple[tuple[Any, Any], ...]) -> Any:
    """The query narrowed by each (column, value) pair whose value was given (not None)."""
    return query.where(*(column == value for column, value in filters if value is not None))


class Paging:
    """`?limit=&after=&q=` of an admin list: rows in id order after the cursor `after`, at most `limit` of them
    (so no answer ships a 100,000-key table), optionally only those whose name contains `q` (any case). A
    further page is announced as `X-Next-Cursor` and a `Link: <…>; rel="next"` header; the body stays a list."""

    def __init__(self, limit: int = Query(1000, ge=1, le=1000),
                 after: int | None = Query(None, ge=0, le=2**31 - 1),
                 q: str | None = Query(None, min_length=1, max_length=200)) -> None:
        self.limit, self.after, self.q = limit, after, q

    def rows(self, s: Session, query: Any, model: Any, name: Any, request: Request, response: Response,
             filters: tuple[tuple[Any, Any], ...] = ()) -> list:
        """`filters`: (column, value) pairs, each applied when its value was given."""
        query = where_given(query, filters)
        if self.q is not None:
            query = query.where(func.lower(name).contains(self.q.lower(), autoescape=True))
        if self.after is not None:
            query = query.where(model.id > self.after)
        rows = list(s.exec(query.order_by(model.id).limit(self.limit + 1)).all())
        if len(rows) > self.limit:
            rows = rows[:self.limit]
            response.headers["X-Next-Cursor"] = str(rows[-1].id)
            response.headers["Link"] = f'<{request.url.include_query_params(after=rows[-1].id)}>; rel="next"'
        return rows
