"""The service layer's bulk writes, by admin.service's rules (validated by the admin schemas, audited, one config
version per transaction): keys made by the thousand, and channels and policies imported as GET /admin/export
gives them. One transaction each: a batch lands whole or not at all, and every process reloads it at once."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from admin.crud import snapshot_row
from admin.schemas import ChannelCreate, KeyBatch, PolicyCreate
from admin.service import next_version, sealed, settled, stamp, stored_rules
from relay.auth import hash_secret, new_secret, shown_prefix
from relay.errors import APIError, bad_request, not_found
from relay.models import ApiKey, AuditEvent, Channel, ModelPolicy, Tenant, utcnow
from relay.secrets import SecretBox

REDACTED = "***"  # how an export shows a secret (admin.crud)
PLURAL = {"channel": "channels", "policy": "policies"}


def create_keys(s: Session, body: KeyBatch, actor: str) -> list[tuple[ApiKey, str]]:
    """`count` keys, named `<name>-1` …, with one audit event naming them all; each secret exists only in the
    answer (the rows keep its SHA-256)."""
    if s.get(Tenant, body.tenant_id) is None:
        raise not_found(f"No tenant with id {body.tenant_id}.", "tenant_id", "tenant_not_found")
    version = stamp(s)
    fields = body.model_dump(exclude={"count", "name"})
    made = []
    for i in range(1, body.count + 1):
        secret = new_secret()
        made.append((ApiKey(**fields, name=f"{body.name}-{i}", prefix=shown_prefix(secret),
                            key_hash=hash_secret(secret), config_version=version), secret))
    s.add_all([key for key, _ in made])
    s.flush()
    s.add(AuditEvent(actor=actor, action="create", entity="api_key", entity_id=made[0][0].id, before=None,
                     after={**body.model_dump(mode="json", exclude={"count"}), "batch": body.count,
                            "ids": [key.id for key, _ in made]}))
    s.commit()  # with expire_on_commit=False (the admin API's sessions) the rows need no reading back
    return made


def _without_redacted(value: Any) -> tuple[Any, bool]:
    """The value with every `***` an export put in place of a secret left out, and whether there was one."""
    if isinstance(value, dict):
        kept, found = {}, False
        for k, v in value.items():
            if v == REDACTED:
                found = True
                continue
            kept[k], inner = _without_redacted(v)
            found = found or inner
        return kept, found
    if isinstance(value, list):
        items = [_without_redacted(v) for v in value]
        return [v for v, _ in items], any(f for _, f in items)
    return value, False


def import_config(s: Session, channels: list[ChannelCreate], policies: list[PolicyCreate], actor: str,
                  box: SecretBox) -> dict[str, int]:
    """Channels by name and policies by (model_pattern, tenant_id): created when absent, otherwise updated with
    what the import gives. Secrets are never exported: an existing channel keeps its key, and its options and
    base URL where the import shows them redacted; a new channel gets none of them."""
    for what, keys in (("channels", [c.name for c in channels]),
                       ("policies", [(p.model_pattern, p.tenant_id) for p in policies])):
        twice = next((k for k, n in Counter(keys).items() if n > 1), None)
        if twice is not None:
            raise bad_request(f"{what}: {twice} appears twice in this import; each may appear once.", what)
    version = stamp(s)
    counts: Counter[str] = Counter()
    written: list[tuple[str, Any, dict[str, Any] | None]] = []
    by_name = {c.name: c for c in s.exec(select(Channel)).all()}
    for body in channels:
        fields = body.model_dump(exclude_none=True)
        row = by_name.get(body.name)
        options, redacted = _without_redacted(fields.get("options") or {})
        fields["options"] = options
        if row is not None and redacted:
            del fields["options"]  # the existing secrets stay
        before = snapshot_row(row)
        if row is None:
            row = by_name[body.name] = Channel(**sealed(fields, box))
        else:
            for name, value in sealed(fields, box).items():
                setattr(row, name, value)
        written.append(("channel", row, before))
    tenants = set(s.exec(select(Tenant.id)).all())
    by_key: dict[tuple[str, int | None], ModelPolicy] = {}
    for existing in s.exec(select(ModelPolicy).order_by(ModelPolicy.id)).all():  # of duplicates, the oldest
        by_key.setdefault((existing.model_pattern, existing.tenant_id), existing)
    for i, body in enumerate(policies):
        if body.tenant_id is not None and body.tenant_id not in tenants:
            raise bad_request(f"policies.{i}: no tenant with id {body.tenant_id}.", f"policies.{i}.tenant_id")
        fields = {**body.model_dump(exclude={"rules", "preset"}), "rules": stored_rules(body.rules, body.preset)}
        row = by_key.get((body.model_pattern, body.tenant_id))
        before = snapshot_row(row)
        if row is None:
            row = by_key[(body.model_pattern, body.tenant_id)] = ModelPolicy(**fields)
        else:
            for name, value in fields.items():
                setattr(row, name, value)
            next_version(row)
        written.append(("policy", row, before))
    for entity, row, before in written:
        row.config_version, row.updated_at = version, utcnow()
        s.add(row)
        counts[f"{PLURAL[entity]}_{'created' if before is None else 'updated'}"] += 1
    try:
        s.flush()
    except IntegrityError as exc:
        s.rollback()
        raise APIError(409, "The import conflicts with an existing row.", "invalid_request_error", None,
                       "conflict") from exc
    s.add_all([AuditEvent(actor=actor, action="import", entity=entity, entity_id=row.id, before=before,
                          after=snapshot_row(settled(s, row))) for entity, row, before in written])
    s.commit()
    return dict(counts)
