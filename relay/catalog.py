"""The in-memory configuration: keys, tenants, channels and policies, so the request path never queries the
database. It reloads when this process edits the configuration, and when the database's config version
(relay.config_state) has moved past the one it holds: polled every RELAY_CONFIG_POLL_S, and nudged at once
through Redis pub/sub when another process announces an edit (relay.config_sync).

A reload reads only what changed: every configuration row carries the config version of the write that last
touched it, and every delete leaves (entity, id, version) in config_deletions (admin.service stamps both in the
write's own transaction). A process holding version N reads the rows and deletions above N and applies them to
a copy of its snapshot, rebuilding what derives from a table (channels per model, the policy index) only when
that table changed. Everything is read as plain rows, not ORM objects: 100,000 keys load in about a second."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import ipaddress
import json
import logging
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Text, select, type_coerce

from channels.base import Channel, ChannelConfig
from channels.registry import build
from relay import config_state
from relay.models import ApiKey, ConfigDeletion, ModelPolicy, Tenant
from relay.models import Channel as ChannelRow
from relay.policy import PolicyInfo
from relay.policy_index import PolicyIndex
from relay.policy_rules import Rules
from relay.secrets import SecretBox

log = logging.getLogger("relay.catalog")

FULL_RELOAD_AFTER = 10_000  # versions behind: reading everything is cheaper than this many changes

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TenantInfo:
    id: int
    name: str
    active: bool
    token_quota: int | None
    rpm: int | None
    tpm: int | None
    priority: int | None = None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    tenant_id: int
    name: str
    models: frozenset[str] | None
    networks: tuple[IPNetwork, ...] | None
    expires_at: datetime | None
    active: bool
    token_quota: int | None
    rpm: int | None = None
    tpm: int | None = None


@dataclass
class Snapshot:
    # The one structure updated in place (by the reload thread, under the catalog's lock): at 100,000 keys a copy
    # per admin write would cost milliseconds and churn memory. Lookups by hash stay safe meanwhile (single dict
    # operations are atomic); nothing iterates it but the reload itself.
    keys_by_hash: dict[str, KeyInfo] = field(default_factory=dict)
    tenants: dict[int, TenantInfo] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    # requested model name -> enabled channels serving it
    channels_by_model: dict[str, list[Channel]] = field(default_factory=dict)
    policy_by_id: dict[int, PolicyInfo] = field(default_factory=dict)  # enabled model policies
    policy_index: PolicyIndex = field(default_factory=lambda: PolicyIndex([]))

    @property
    def policies(self) -> list[PolicyInfo]:
        return self.policy_index.policies


def _key_info(row: Any) -> KeyInfo:
    """From a row of _KEY_COLUMNS (positional: 100,000 of them are read at start)."""
    key_id, tenant_id, name, _, models, ip_allow, expires_at, status, token_quota, rpm, tpm = row
    models, ip_allow = _json(models), _json(ip_allow)
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in ip_allow) if ip_allow else None
    return KeyInfo(key_id, tenant_id, name, frozenset(models) if models else None, networks, expires_at,
                   status == "active", token_quota, rpm, tpm)


def channel_config(row: Any, box: SecretBox) -> ChannelConfig:
    """The adaptor's copy of a row, its secrets decrypted (they exist in plaintext only in memory)."""
    return ChannelConfig(id=row.id, name=row.name, type=row.type, base_url=row.base_url,
                         api_key=box.decrypt(row.api_key), models=tuple(row.models or ()),
                         model_mapping=dict(row.model_mapping or {}), priority=row.priority, weight=row.weight,
                         timeout_s=row.timeout_s, retries=row.retries, max_inflight=row.max_inflight,
                         options=box.open_options(row.options or {}),
                         capabilities=dict(row.capabilities or {}),
                         passthrough=frozenset(row.passthrough) if row.passthrough is not None else None)


# The JSON columns as their text (parsed below only when set: most keys have neither): a third off reading them.
_KEY_COLUMNS = (ApiKey.id, ApiKey.tenant_id, ApiKey.name, ApiKey.key_hash, type_coerce(ApiKey.models, Text),
                type_coerce(ApiKey.ip_allow, Text), ApiKey.expires_at, ApiKey.status, ApiKey.token_quota,
                ApiKey.rpm, ApiKey.tpm)
def _json(value: Any) -> Any:
    """A JSON column read as text (SQLite), or already parsed by the driver (psycopg parses json itself)."""
    return json.loads(value) if isinstance(value, str) else value


_TENANT_COLUMNS = (Tenant.id, Tenant.name, Tenant.status, Tenant.token_quota, Tenant.rpm, Tenant.tpm, Tenant.priority)
_POLICY_COLUMNS = (ModelPolicy.id, ModelPolicy.version, ModelPolicy.model_pattern, ModelPolicy.tenant_id,
                   ModelPolicy.priority, ModelPolicy.rules, ModelPolicy.enabled)


@dataclass
class Changes:
    """Rows written (and ids deleted, per entity) after a version; everything when read from scratch."""

    tenants: list[Any]
    keys: list[tuple[str, KeyInfo]]  # (hash, key): built while reading, so 100,000 rows are never held at once
    channels: list[Any]
    policies: list[Any]
    deleted: dict[str, set[int]]

    @property
    def empty(self) -> bool:
        return not (self.tenants or self.keys or self.channels or self.policies or self.deleted)


def read_changes(engine: Engine, since: int | None) -> Changes:
    """Plain rows, not ORM objects: a 100,000-key catalog is read in well under a second."""
    def changed(columns: tuple, version: Any) -> Any:
        return select(*columns) if since is None else select(*columns).where(version > since)

    with engine.connect() as conn:
        def rows(columns: tuple, version: Any) -> list[Any]:
            return list(conn.execute(changed(columns, version)).all())

        deleted: dict[str, set[int]] = {}
        if since is not None:
            for entity, row_id in rows((ConfigDeletion.entity, ConfigDeletion.row_id), ConfigDeletion.config_version):
                deleted.setdefault(entity, set()).add(row_id)
        keys = [(row[3], _key_info(row)) for batch in conn.execution_options(yield_per=2000)
                .execute(changed(_KEY_COLUMNS, ApiKey.config_version)).partitions() for row in batch]
        return Changes(rows(_TENANT_COLUMNS, Tenant.config_version), keys,
                       rows(tuple(ChannelRow.__table__.c), ChannelRow.config_version),
                       rows(_POLICY_COLUMNS, ModelPolicy.config_version), deleted)


def apply_changes(old: Snapshot, changes: Changes, box: SecretBox) -> Snapshot:
    """A new snapshot: the old one's structures where nothing changed, copies with the changes where it did (the
    key map excepted: it is updated in place)."""
    new = replace(old)
    gone = changes.deleted
    if changes.tenants or gone.get("tenant"):
        new.tenants = {i: t for i, t in old.tenants.items() if i not in gone.get("tenant", ())}
        for t in changes.tenants:
            new.tenants[t.id] = TenantInfo(t.id, t.name, t.status == "active", t.token_quota, t.rpm, t.tpm,
                                           t.priority)
    keys = new.keys_by_hash
    if gone.get("api_key"):  # only a tenant's delete takes keys along (a key itself is revoked): rare, so a scan
        for digest in [h for h, k in keys.items() if k.id in gone["api_key"]]:
            del keys[digest]
    keys.update(changes.keys)  # a key's hash never changes: its entry is replaced
    if changes.channels or gone.get("channel"):
        new.channels = {i: c for i, c in old.channels.items() if i not in gone.get("channel", ())}
        for c in changes.channels:
            new.channels.pop(c.id, None)
            if c.status != "enabled":
                continue
            try:
                new.channels[c.id] = build(channel_config(c, box))
            except Exception as exc:  # a broken plugin (or an undecryptable secret) must not take the gateway down
                log.error("channel %s (%s) not loaded: %s", c.name, c.type, exc)
        new.channels_by_model = {}
        for cid in sorted(new.channels):
            for model in new.channels[cid].config.models:
                new.channels_by_model.setdefault(model, []).append(new.channels[cid])
    if changes.policies or gone.get("policy"):
        new.policy_by_id = {i: p for i, p in old.policy_by_id.items() if i not in gone.get("policy", ())}
        alike: dict[str, Rules] = {}  # policies with the same rules (a preset, say) share one parsed copy
        for p in changes.policies:
            new.policy_by_id.pop(p.id, None)
            if not p.enabled:
                continue
            text = json.dumps(p.rules, sort_keys=True)
            try:
                rules = alike[text] if text in alike else alike.setdefault(text, Rules.model_validate(p.rules))
            except ValueError as exc:  # written around the admin API: skip it, keep serving
                log.error("policy %s has invalid rules and is ignored: %s", p.id, exc)
                continue
            new.policy_by_id[p.id] = PolicyInfo(p.id, p.version, p.model_pattern, p.tenant_id, p.priority, rules)
        new.policy_index = PolicyIndex([new.policy_by_id[i] for i in sorted(new.policy_by_id)])
    return new


def load_snapshot(engine: Engine, box: SecretBox) -> Snapshot:
    return apply_changes(Snapshot(), read_changes(engine, None), box)


def _settle_memory() -> None:
    """After the first full read, at start: the catalog's objects move out of the collector's way (gc.freeze: a
    full collection no longer walks 100,000 keys on some request's time), and the rows read to build them are
    handed back to the system (malloc_trim; glibc only) instead of staying in the process's resident size."""
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


class Catalog:
    def __init__(self, engine: Engine, box: SecretBox) -> None:
        self.engine = engine
        self.box = box
        self.snapshot = Snapshot()
        self.version = -1  # the config version the snapshot was read at
        # Serialises reloads: a poll that read the database before an admin edit must not install its
        # older snapshot after the edit's own reload.
        self._lock = threading.Lock()

    def reload(self) -> None:
        with self._lock:
            # The version first: an edit committed while the snapshot is read leaves the version behind, so
            # the next check reloads again rather than missing it.
            version = config_state.version(self.engine)
            self.snapshot = load_snapshot(self.engine, self.box)
            self.version = version
            _settle_memory()

    def reload_if_changed(self) -> bool:
        """Applies what changed since the version held: only those rows (a full read when none is held yet, or
        when it fell more than FULL_RELOAD_AFTER versions behind)."""
        with self._lock:
            version = config_state.version(self.engine)
            if version == self.version:
                return False
            # A version that went back (a restored backup) cannot be compared with the one held: read everything.
            behind = version - self.version
            changes = read_changes(self.engine, self.version) if 0 < behind <= FULL_RELOAD_AFTER else None
            if changes is None or changes.empty:
                # Nothing stamped above the version held although it moved: a write by a process of an older
                # release (or by hand) that stamps nothing — only a full read sees it.
                self.snapshot = load_snapshot(self.engine, self.box)
            else:
                self.snapshot = apply_changes(self.snapshot, changes, self.box)
            self.version = version
            return True

    async def refresh(self) -> None:
        """Off the event loop; the database may blip: then the last snapshot keeps serving."""
        try:
            if await asyncio.to_thread(self.reload_if_changed):
                log.info("configuration reloaded (version %d)", self.version)
        except Exception as exc:
            log.warning("configuration check failed: %s", str(exc).splitlines()[0][:300])
