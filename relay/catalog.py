"""The in-memory configuration: keys, tenants and channels, so the request path never queries the
database. It reloads when this process edits the configuration (invalidate) and when a cheap
fingerprint query shows that another process did (poll)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, func, select
from sqlmodel import Session

from channels.base import Channel, ChannelConfig
from channels.registry import build
from relay.models import ApiKey, ModelPolicy, Tenant
from relay.models import Channel as ChannelRow
from relay.policy import PolicyInfo
from relay.policy_rules import Rules

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


def channel_config(row: ChannelRow) -> ChannelConfig:
    return ChannelConfig(id=row.id, name=row.name, type=row.type, base_url=row.base_url, api_key=row.api_key,
                         models=tuple(row.models or ()), model_mapping=dict(row.model_mapping or {}),
                         priority=row.priority, weight=row.weight, timeout_s=row.timeout_s,
                         retries=row.retries, options=dict(row.options or {}),
                         capabilities=dict(row.capabilities or {}))


def load_snapshot(engine: Engine) -> Snapshot:
    snap = Snapshot()
    with Session(engine) as s:
        for t in s.exec(select(Tenant)).scalars():
            snap.tenants[t.id] = TenantInfo(t.id, t.name, t.status == "active", t.token_quota, t.rpm, t.tpm)
        for k in s.exec(select(ApiKey)).scalars():
            snap.keys_by_hash[k.key_hash] = _key_info(k)
        for c in s.exec(select(ChannelRow).where(ChannelRow.status == "enabled")).scalars():
            try:
                channel = build(channel_config(c))
            except Exception as exc:  # a broken plugin must not take the gateway down
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


_FINGERPRINTED = (Tenant, ApiKey, ChannelRow, ModelPolicy)


def fingerprint(engine: Engine) -> tuple:
    """Changes whenever a configuration row is inserted, updated (updated_at) or deleted (count)."""
    with Session(engine) as s:
        return tuple(tuple(s.exec(select(func.count(), func.max(t.updated_at)).select_from(t)).one())
                     for t in _FINGERPRINTED)


class Catalog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.snapshot = Snapshot()
        self._fingerprint: tuple | None = None
        # Serialises reloads: a poll that read the database before an admin edit must not install its
        # older snapshot after the edit's own reload.
        self._lock = threading.Lock()

    def reload(self) -> None:
        with self._lock:
            self._fingerprint = fingerprint(self.engine)
            self.snapshot = load_snapshot(self.engine)

    def reload_if_changed(self) -> bool:
        with self._lock:
            fp = fingerprint(self.engine)
            if fp == self._fingerprint:
                return False
            self._fingerprint = fp
            self.snapshot = load_snapshot(self.engine)
            return True

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                if await asyncio.to_thread(self.reload_if_changed):
                    log.info("configuration reloaded")
            except Exception as exc:  # the database may blip; keep serving the last snapshot
                log.warning("configuration poll failed: %s", exc)
