"""The one service layer every configuration write goes through — admin routers, the CLI, `serve`'s
bootstrap and the ONE API importer: each write is validated by the admin schemas, stored with its audit event
(actor `admin`, `cli`, `bootstrap`, `import`, `relay`) and a config-version bump, in one transaction.

Functions take a Session and return rows; the caller tells its own process's catalog to reload (other
processes see the version move)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import delete, inspect, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, select

from admin.crud import get_or_404, snapshot_row
from admin.schemas import (
    ChannelCreate,
    ChannelUpdate,
    KeyCreate,
    KeyUpdate,
    PolicyCreate,
    PolicyUpdate,
    TenantCreate,
    TenantUpdate,
)
from relay import config_state
from relay.auth import hash_secret, new_secret, shown_prefix
from relay.errors import APIError, bad_request, not_found
from relay.models import ApiKey, AuditEvent, Channel, ConfigDeletion, ModelPolicy, Tenant, utcnow
from relay.policy_rules import PRESETS, Rules, with_task_default
from relay.secrets import SecretBox

Row = TypeVar("Row", bound=SQLModel)


def parsed(schema: type[Any], **fields: Any) -> Any:
    """Fields from outside the admin API (CLI, bootstrap) through its own schema: the same validation, and its
    first error as a 400 naming the field. None means left out."""
    try:
        return schema(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise bad_request(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


def save(s: Session, *, action: str, entity: str, row: SQLModel, before: dict[str, Any] | None,
         actor: str, after: dict[str, Any] | None = None, deleted: dict[str, list[int]] | None = None) -> None:
    """Commits the pending change, its audit event and the config-version bump together: the row carries the new
    version, and a deleted row (with `deleted`, rows removed along with it) leaves a config_deletions record."""
    version = stamp(s)
    if action != "delete":
        if hasattr(row, "updated_at"):
            row.updated_at = utcnow()
        row.config_version = version  # type: ignore[attr-defined]
        s.add(row)
    else:
        forget(s, version, {**(deleted or {}), entity: [row.id]})  # type: ignore[attr-defined]
    try:
        s.flush()
        if after is None and action != "delete":
            after = snapshot_row(settled(s, row))
        s.add(AuditEvent(actor=actor, action=action, entity=entity, entity_id=getattr(row, "id", None),
                         before=before, after=after))
        s.commit()
    except IntegrityError as exc:
        s.rollback()
        raise APIError(409, f"This {entity} conflicts with an existing one (names must be unique).",
                         "invalid_request_error", "name", "conflict") from exc
    if action != "delete":
        s.refresh(row)


def settled(s: Session, row: Row) -> Row:
    """The flushed row with what a SQL expression set (a policy's version, counted by the database) read back."""
    if inspect(row).expired_attributes:
        s.refresh(row)
    return row


def next_version(row: ModelPolicy) -> None:
    """A policy's version is part of the cache key: an edit never serves answers cached under old rules. Counted
    up by the database, so an edit racing an adaptive step (admin.adaptive) never leaves two rule sets under one
    version."""
    row.version = ModelPolicy.version + 1  # type: ignore[assignment]


def stamp(s: Session) -> int:
    """The config version this transaction's writes carry, bumped now. Before anything else is written (changes
    already made to loaded rows wait: no autoflush), so every write locks relay_state first and the row second —
    one order for all of them, no deadlock between, say, a PATCH and an auto-disable of one channel."""
    with s.no_autoflush:
        return config_state.bump(s)


def forget(s: Session, version: int, deleted: dict[str, list[int]]) -> None:
    """Records deleted rows, so processes that reload only what changed drop them too."""
    s.add_all([ConfigDeletion(entity=entity, row_id=row_id, config_version=version)
               for entity, ids in deleted.items() for row_id in ids])


def _edit(s: Session, model: type[Row], row_id: int, entity: str, changes: dict[str, Any], actor: str,
          action: str = "update") -> Row:
    """Fetch (or 404), change, save with the before and after in the audit log."""
    row = get_or_404(s, model, row_id, entity)
    before = snapshot_row(row)
    for name, value in changes.items():
        setattr(row, name, value)
    if isinstance(row, ModelPolicy):
        next_version(row)
    save(s, action=action, entity=entity, row=row, before=before, actor=actor)
    return row


def _remove(s: Session, model: type[Row], row_id: int, entity: str, actor: str,
            deleted: dict[str, list[int]] | None = None) -> None:
    row = get_or_404(s, model, row_id, entity)
    before = snapshot_row(row)
    s.delete(row)
    save(s, action="delete", entity=entity, row=row, before=before, actor=actor, deleted=deleted)


# --- tenants -------------------------------------------------------------------------------------

def create_tenant(s: Session, body: TenantCreate, actor: str) -> Tenant:
    tenant = Tenant(**body.model_dump())
    save(s, action="create", entity="tenant", row=tenant, before=None, actor=actor)
    return tenant


def update_tenant(s: Session, tenant_id: int, body: TenantUpdate, actor: str) -> Tenant:
    return _edit(s, Tenant, tenant_id, "tenant", body.model_dump(exclude_unset=True), actor)


def delete_tenant(s: Session, tenant_id: int, actor: str) -> None:
    """Deletes the tenant with its keys and policies; request logs keep their history."""
    get_or_404(s, Tenant, tenant_id, "tenant")
    stamp(s)  # relay_state first (see stamp); a key made for this tenant meanwhile waits, and is then refused
    keys = list(s.exec(select(ApiKey.id).where(ApiKey.tenant_id == tenant_id)).all())
    policies = list(s.exec(select(ModelPolicy.id).where(ModelPolicy.tenant_id == tenant_id)).all())
    s.execute(delete(ApiKey).where(ApiKey.tenant_id == tenant_id))
    s.execute(delete(ModelPolicy).where(ModelPolicy.tenant_id == tenant_id))
    _remove(s, Tenant, tenant_id, "tenant", actor, {"api_key": keys, "policy": policies})


def tenant_by_name_or_id(s: Session, ref: str) -> Tenant:
    tenant = s.exec(select(Tenant).where(Tenant.name == ref)).first()
    if tenant is None and ref.isdigit():
        tenant = s.get(Tenant, int(ref))
    if tenant is None:
        raise not_found(f"No tenant named {ref!r}.", "tenant", "tenant_not_found")
    return tenant


# --- keys ----------------------------------------------------------------------------------------

def create_key(s: Session, body: KeyCreate, actor: str) -> tuple[ApiKey, str]:
    """The new row and its secret, which exists nowhere else: only its SHA-256 is stored."""
    if s.get(Tenant, body.tenant_id) is None:
        raise not_found(f"No tenant with id {body.tenant_id}.", "tenant_id", "tenant_not_found")
    secret = new_secret()
    key = ApiKey(**body.model_dump(), prefix=shown_prefix(secret), key_hash=hash_secret(secret))
    save(s, action="create", entity="api_key", row=key, before=None, actor=actor)
    return key, secret


def update_key(s: Session, key_id: int, body: KeyUpdate, actor: str) -> ApiKey:
    return _edit(s, ApiKey, key_id, "api_key", body.model_dump(exclude_unset=True), actor)


def revoke_key(s: Session, key_id: int, actor: str) -> ApiKey:
    """The row stays, so usage history still names the key."""
    return _edit(s, ApiKey, key_id, "api_key", {"status": "revoked"}, actor, action="revoke")


# --- channels ------------------------------------------------------------------------------------

def sealed(fields: dict[str, Any], box: SecretBox) -> dict[str, Any]:
    """Secrets are encrypted before they reach a row (and so the database and the audit log); capability
    overrides keep only what the operator set."""
    if isinstance(fields.get("capabilities"), dict):
        fields["capabilities"] = {k: v for k, v in fields["capabilities"].items() if v is not None}
    if fields.get("api_key") is not None:
        fields["api_key"] = box.seal(fields["api_key"])
    if fields.get("options") is not None:
        fields["options"] = box.seal_options(fields["options"])
    return fields


def create_channel(s: Session, body: ChannelCreate, actor: str, box: SecretBox) -> Channel:
    channel = Channel(**sealed(body.model_dump(exclude_none=True), box))
    save(s, action="create", entity="channel", row=channel, before=None, actor=actor)
    return channel


def update_channel(s: Session, channel_id: int, body: ChannelUpdate, actor: str, box: SecretBox) -> Channel:
    return _edit(s, Channel, channel_id, "channel", sealed(body.model_dump(exclude_unset=True), box), actor)


def delete_channel(s: Session, channel_id: int, actor: str) -> None:
    _remove(s, Channel, channel_id, "channel", actor)


def upsert_local_channel(s: Session, name: str, url: str, model: str, actor: str) -> Channel:
    """The channel of a worker started by `serve --with-worker` (or named by `--worker-url`)."""
    parsed(ChannelCreate, name=name, type="local", base_url=url, models=[model])  # the admin API's own checks
    channel = s.exec(select(Channel).where(Channel.name == name)).first()
    before = snapshot_row(channel)
    if channel is None:
        channel = Channel(name=name, type="local", models=[model])
    # A worker serves one model: a restart with another one must not leave the old name routed to it.
    channel.type, channel.base_url, channel.status, channel.models = "local", url, "enabled", [model]
    if before is not None and before == snapshot_row(channel):
        return channel  # nothing changed: no audit event, no reload everywhere
    save(s, action="create" if before is None else "update", entity="channel", row=channel, before=before,
         actor=actor)
    return channel


def auto_disable(s: Session, channel_id: int, reason: str) -> bool:
    """Sets an enabled channel to auto_disabled (once), audited; False when it was not enabled."""
    version = stamp(s)
    result = s.execute(update(Channel).where(Channel.id == channel_id, Channel.status == "enabled")
                       .values(status="auto_disabled", updated_at=utcnow(), config_version=version))
    if not result.rowcount:
        s.rollback()
        return False
    s.add(AuditEvent(actor="relay", action="auto_disable", entity="channel", entity_id=channel_id,
                     before={"status": "enabled"}, after={"status": "auto_disabled", "reason": reason}))
    s.commit()
    return True


# --- cache ---------------------------------------------------------------------------------------

def record_cache_purge(s: Session, filters: dict[str, Any], purged: int, actor: str) -> None:
    """A purge changes no configuration (no version bump) but is an operator's act: audited like one."""
    s.add(AuditEvent(actor=actor, action="purge", entity="cache", entity_id=None, before=None,
                     after={**filters, "purged": purged}))
    s.commit()


# --- policies ------------------------------------------------------------------------------------

def check_tenant(s: Session, tenant_id: int | None) -> None:
    if tenant_id is not None and s.get(Tenant, tenant_id) is None:
        raise not_found(f"No tenant with id {tenant_id}.", "tenant_id", "tenant_not_found")


def stored_rules(rules: Rules | None, preset: str | None) -> dict[str, Any]:
    """What a policy row keeps: the rules given, or the preset's, validated and without unset fields."""
    return (rules or Rules.model_validate(PRESETS[preset or ""])).model_dump(exclude_none=True)


def create_policy(s: Session, body: PolicyCreate, actor: str) -> ModelPolicy:
    check_tenant(s, body.tenant_id)
    policy = ModelPolicy(**body.model_dump(exclude={"rules", "preset"}), rules=stored_rules(body.rules, body.preset))
    save(s, action="create", entity="policy", row=policy, before=None, actor=actor)
    return policy


def update_policy(s: Session, policy_id: int, body: PolicyUpdate, actor: str) -> ModelPolicy:
    get_or_404(s, ModelPolicy, policy_id, "policy")  # a missing policy is named before a missing tenant
    changes = body.model_dump(exclude_unset=True, exclude={"rules", "preset"})
    if body.rules is not None or body.preset is not None:
        if body.rules is not None and body.preset is not None:
            raise bad_request("Give at most one of `rules` and `preset`.", "rules")
        changes["rules"] = stored_rules(body.rules, body.preset)
    if "tenant_id" in changes:
        check_tenant(s, changes["tenant_id"])
    return _edit(s, ModelPolicy, policy_id, "policy", changes, actor)


def delete_policy(s: Session, policy_id: int, actor: str) -> None:
    _remove(s, ModelPolicy, policy_id, "policy", actor)


def record_probe(s: Session, channel_id: int, result: dict[str, Any]) -> Channel:
    """Stores a channel's probe result. A measurement, not an edit of the configuration (like the channel
    test): no audit event, no version bump, no reload anywhere."""
    row = get_or_404(s, Channel, channel_id, "channel")  # read again: the probe took a while
    row.probe, row.probed_at = result, utcnow()
    s.add(row)
    s.commit()
    s.refresh(row)
    return row


def apply_probed_rules(s: Session, models: list[str], rules: dict[str, Any], actor: str) -> list[ModelPolicy]:
    """The probe's proposal as the all-tenant policy of each model: the one whose pattern is exactly that model is
    updated — each rule the probe proposes replaces the same fields of the existing one, the rest stays — and
    enabled, or one is created; audited like any policy write. A merge the schema refuses is a 400."""
    written = []
    for model in models:
        existing = s.exec(select(ModelPolicy).where(ModelPolicy.model_pattern == model,
                                                    ModelPolicy.tenant_id.is_(None))).first()  # type: ignore
        old = dict(existing.rules or {}) if existing is not None else {}
        merged = {**old, **{k: ({**old[k], **v} if isinstance(v, dict) and isinstance(old.get(k), dict) else v)
                            for k, v in rules.items()}}
        try:
            valid = Rules.model_validate(merged)
        except ValidationError as exc:
            raise bad_request(f"The proposal does not fit the existing policy of `{model}`: "
                              f"{exc.errors()[0]['msg']}; edit that policy first.", "apply") from None
        if existing is None:
            written.append(create_policy(s, PolicyCreate(model_pattern=model, rules=valid), actor))
        else:
            written.append(update_policy(s, existing.id, PolicyUpdate(rules=valid, enabled=True), actor))
    return written


def adapt_temperature(s: Session, policy_id: int, version: int, task: str, value: float,
                      evidence: dict[str, Any]) -> bool:
    """One step of `temperature.adaptive`: by_task[task] becomes `value`, audited with its evidence (actor `relay`,
    action `adapt`) — only if the policy is still enabled at the version the evidence was judged against. Every
    gateway process runs the adaptive check; the conditional update makes sure a step is taken once. True when
    this call took it."""
    row = s.get(ModelPolicy, policy_id)
    if row is None or row.version != version or not row.enabled:
        return False
    before = snapshot_row(row)
    rules = with_task_default(row.rules, task, value)
    Rules.model_validate(rules)  # a step never leaves the schema (it stays within min and max)
    config_version = stamp(s)
    taken = s.execute(update(ModelPolicy).where(ModelPolicy.id == policy_id, ModelPolicy.version == version)
                      .values(rules=rules, version=version + 1, updated_at=utcnow(), config_version=config_version))
    if taken.rowcount != 1:
        s.rollback()
        return False
    after = {**(before or {}), "rules": rules, "version": version + 1, "evidence": evidence}
    s.add(AuditEvent(actor="relay", action="adapt", entity="policy", entity_id=policy_id, before=before,
                     after=after))
    s.commit()
    return True
