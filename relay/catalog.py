"""The in-memory configuration: keys, tenants, channels and policies, so the request path never queries the
database. It reloads when this process edits the configuration, and when the database's config version
(relay.config_state) has moved past the one it holds: polled every RELAY_CONFIG_POLL_S, and nudged at once
through Redis pub/sub when another process announces an edit (relay.config_sync)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, select
from sqlmodel import Session

from channels.base import Channel, ChannelConfig
from channels.registry import build
from relay import config_state
from relay.models import ApiKey, ModelPolicy, Tenant
from relay.models import Channel as ChannelRow
from relay.policy import PolicyInfo
from relay.policy_rules import Rules
from relay.secrets import SecretBox

log = logging.getLogger("relay.catalog")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TenantInfo:
    id: int
    name: str
    active: bool
    token_quota: int | None
    rpm: int | None
    tpm: int | None


@dataclass(frozen=True)
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
    keys_by_hash: dict[str, KeyInfo] = field(default_factory=dict)
    tenants: dict[int, TenantInfo] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    # requested model name -> enabled channels serving it
    channels_by_model: dict[str, list[Channel]] = field(default_factory=dict)
    policies: list[PolicyInfo] = field(default_factory=list)  # enabled model policies


def _key_info(row: ApiKey) -> KeyInfo:
    networks = None
    if row.ip_allow:
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in row.ip_allow)
    return KeyInfo(id=row.id, tenant_id=row.tenant_id, name=row.name,
                   models=frozenset(row.models) if row.models else None, networks=networks,
                   expires_at=row.expires_at, active=row.status == "active", token_quota=row.token_quota,
                   rpm=row.rpm, tpm=row.tpm)


def channel_config(row: ChannelRow, box: SecretBox) -> ChannelConfig:
    """The adaptor's copy of a row, its secrets decrypted (they exist in plaintext only in memory)."""
    return ChannelConfig(id=row.id, name=row.name, type=row.type, base_url=row.base_url,
                         api_key=box.decrypt(row.api_key), models=tuple(row.models or ()),
                         model_mapping=dict(row.model_mapping or {}), priority=row.priority, weight=row.weight,
                         timeout_s=row.timeout_s, retries=row.retries, options=box.open_options(row.options or {}),
                         capabilities=dict(row.capabilities or {}),
                         passthrough=frozenset(row.passthrough) if row.passthrough is not None else None)


def load_snapshot(engine: Engine, box: SecretBox) -> Snapshot:
    snap = Snapshot()
    with Session(engine) as s:
        for t in s.exec(select(Tenant)).scalars():
            snap.tenants[t.id] = TenantInfo(t.id, t.name, t.status == "active", t.token_quota, t.rpm, t.tpm)
        for k in s.exec(select(ApiKey)).scalars():
            snap.keys_by_hash[k.key_hash] = _key_info(k)
        for c in s.exec(select(ChannelRow).where(ChannelRow.status == "enabled")).scalars():
            try:
                channel = build(channel_config(c, box))
            except Exception as exc:  # a broken plugin (or an undecryptable secret) must not take the gateway down
                log.error("channel %s (%s) not loaded: %s", c.name, c.type, exc)
                continue
            snap.channels[c.id] = channel
            for model in channel.config.models:
                snap.channels_by_model.setdefault(model, []).append(channel)
        for p in s.exec(select(ModelPolicy).where(ModelPolicy.enabled.is_(True))).scalars():
            try:
                rules = Rules.model_validate(p.rules)
            except ValueError as exc:  # written around the admin API: skip it, keep serving
                log.error("policy %s has invalid rules and is ignored: %s", p.id, exc)
                continue
            snap.policies.append(PolicyInfo(p.id, p.version, p.model_pattern, p.tenant_id, p.priority, rules))
    return snap


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

    def reload_if_changed(self) -> bool:
        with self._lock:
            version = config_state.version(self.engine)
            if version == self.version:
                return False
            self.snapshot = load_snapshot(self.engine, self.box)
            self.version = version
            return True

    async def refresh(self) -> None:
        """Off the event loop; the database may blip: then the last snapshot keeps serving."""
        try:
            if await asyncio.to_thread(self.reload_if_changed):
                log.info("configuration reloaded (version %d)", self.version)
        except Exception as exc:
            log.warning("configuration check failed: %s", str(exc).splitlines()[0][:300])
