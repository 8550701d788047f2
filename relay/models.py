"""Database tables (SQLModel). Alembic migrations in migrations/ must match these exactly;
tests/test_migrations.py fails when they drift apart.

Times are timezone-aware UTC (SQLModel's UTCDateTime), the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, String, Table, Text
from sqlmodel import Field, SQLModel
from sqlmodel.sql.sqltypes import UTCDateTime


def utcnow() -> datetime:
    return datetime.now(UTC)


# Ids are never reused (SQLite AUTOINCREMENT; PostgreSQL sequences never go back): a tenant created after
# another was deleted must not inherit its cache entries, rate buckets or usage history.
NEVER_REUSE_IDS = {"sqlite_autoincrement": True}


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"
    __table_args__ = NEVER_REUSE_IDS

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, unique=True)
    status: str = Field(default="active", max_length=20)  # active | disabled
    token_quota: int | None = Field(default=None, sa_type=BigInteger)
    used_tokens: int = Field(default=0, sa_type=BigInteger)
    rpm: int | None = None
    tpm: int | None = None
    priority: int | None = None  # weight of its share of a busy gateway's slots (relay.admission); None: 1
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    # The config version of the write that last touched this row: a process reloads only rows above its own
    config_version: int = Field(default=0, sa_type=BigInteger, index=True, sa_column_kwargs={"server_default": "0"})


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = NEVER_REUSE_IDS

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: int = Field(foreign_key="tenants.id", index=True)
    name: str = Field(max_length=200)
    prefix: str = Field(max_length=32)  # shown in listings; the secret itself is never stored
    key_hash: str = Field(max_length=64, unique=True)  # sha256 hex of the whole secret
    models: list[str] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))  # None: every model
    ip_allow: list[str] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))  # CIDRs; None: anywhere
    expires_at: datetime | None = None
    status: str = Field(default="active", max_length=20)  # active | revoked
    token_quota: int | None = Field(default=None, sa_type=BigInteger)
    used_tokens: int = Field(default=0, sa_type=BigInteger)
    rpm: int | None = None  # requests per minute for this key (the tenant's limit applies as well)
    tpm: int | None = None  # tokens per minute for this key
    last_used_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    # The config version of the write that last touched this row: a process reloads only rows above its own
    config_version: int = Field(default=0, sa_type=BigInteger, index=True, sa_column_kwargs={"server_default": "0"})


class Channel(SQLModel, table=True):
    __tablename__ = "channels"
    __table_args__ = NEVER_REUSE_IDS

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200, unique=True)
    type: str = Field(max_length=50)  # a key of the channel registry: openai | litellm | local | plugin
    base_url: str | None = Field(default=None, max_length=1000)
    api_key: str | None = Field(default=None, sa_column=Column(Text))  # write-only in every API
    models: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    model_mapping: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    priority: int = 0
    weight: int = 1
    status: str = Field(default="enabled", max_length=20)  # enabled | disabled | auto_disabled
    timeout_s: float = 60.0
    retries: int = 0
    max_inflight: int | None = None  # requests sent to it at once, over all gateway processes; None: no limit
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    capabilities: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    # Non-core request fields this channel's upstream may receive; None: the default list (relay.passthrough)
    passthrough: list[str] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    last_test_at: datetime | None = None
    last_test_ok: bool | None = None
    last_test_latency_ms: float | None = None
    last_test_error: str | None = Field(default=None, sa_column=Column(Text))
    # The last parameter probe (admin.probe): its table and proposal, and when it ran
    probe: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    probed_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    # The config version of the write that last touched this row: a process reloads only rows above its own
    config_version: int = Field(default=0, sa_type=BigInteger, index=True, sa_column_kwargs={"server_default": "0"})


class ModelPolicy(SQLModel, table=True):
    __tablename__ = "model_policies"
    __table_args__ = NEVER_REUSE_IDS

    id: int | None = Field(default=None, primary_key=True)
    model_pattern: str = Field(max_length=200, index=True)  # glob on the requested model name
    tenant_id: int | None = Field(default=None, foreign_key="tenants.id", index=True)
    priority: int = 0
    rules: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    enabled: bool = True
    version: int = 1
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    # The config version of the write that last touched this row: a process reloads only rows above its own
    config_version: int = Field(default=0, sa_type=BigInteger, index=True, sa_column_kwargs={"server_default": "0"})


class RequestLog(SQLModel, table=True):
    __tablename__ = "request_logs"
    # (tenant_id, id): a tenant's own log, newest first by cursor, without sorting all of its rows
    __table_args__ = (Index("ix_request_logs_tenant_id_id", "tenant_id", "id"), NEVER_REUSE_IDS)

    # No foreign keys: history outlives the tenants, keys and channels it mentions.
    id: int | None = Field(default=None, primary_key=True,
                           sa_type=BigInteger().with_variant(Integer, "sqlite"))  # SQLite autoincrements INTEGER only
    created_at: datetime = Field(default_factory=utcnow, index=True)
    tenant_id: int | None = None
    key_id: int | None = None
    endpoint: str = Field(max_length=50)
    model: str = Field(max_length=200)
    upstream_model: str | None = Field(default=None, max_length=200)
    channel_id: int | None = None
    stream: bool = False
    status_code: int
    error_type: str | None = Field(default=None, max_length=100)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    latency_ms: float = 0.0
    cache: str = Field(default="bypass", max_length=10)  # hit | miss | bypass
    policy: str | None = Field(default=None, max_length=50)  # "id@version"
    rewrites: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    request_id: str | None = Field(default=None, max_length=128, index=True)  # X-Request-Id


class ConfigDeletion(SQLModel, table=True):
    """A deleted configuration row, so that processes reloading only what changed drop it too."""

    __tablename__ = "config_deletions"

    id: int | None = Field(default=None, primary_key=True)
    entity: str = Field(max_length=20)  # tenant | api_key | channel | policy
    row_id: int
    config_version: int = Field(sa_type=BigInteger, index=True)


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"
    __table_args__ = NEVER_REUSE_IDS

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(max_length=100)
    action: str = Field(max_length=50)  # create | update | delete | revoke | auto_disable
    entity: str = Field(max_length=50)  # tenant | api_key | channel | policy
    entity_id: int | None = None
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))


class RelayState(SQLModel, table=True):
    """One row (id 1): what identifies this database and its configuration's version."""

    __tablename__ = "relay_state"

    id: int = Field(default=1, primary_key=True)
    # Created with the database: Redis keys carry it, so a recreated database never reads an old Redis.
    deployment_id: str = Field(max_length=32)
    # Bumped in the same transaction as every configuration edit; processes reload when it moves.
    config_version: int = Field(default=0, sa_type=BigInteger)
    secret_check: str | None = Field(default=None, sa_column=Column(Text))  # a known value, encrypted
    created_at: datetime = Field(default_factory=utcnow)


# Upper bounds (ms) of the latency histogram the stats keep: from a cache hit to a long generation. Part of
# the schema: one column per bound.
LATENCY_EDGES_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)
STAT_SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "cache_hits", "cache_misses")
LATENCY_COLUMNS = tuple(f"latency_le_{i}" for i in range(len(LATENCY_EDGES_MS)))  # counts per bin, not cumulative

# The request log rolled up per minute (width 60) and per hour (width 3600) for each model, channel and tenant
# (0: none), written with the log rows in the same transaction; what the dashboard's charts read, so a day of
# a million requests is a few thousand rows to sum. A plain table: its columns are generated from the edges.
request_stats = Table(
    "request_stats", SQLModel.metadata,
    Column("width", Integer, primary_key=True),
    Column("start", UTCDateTime(), primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("channel_id", Integer, primary_key=True),
    Column("tenant_id", Integer, primary_key=True),
    *(Column(name, BigInteger, nullable=False, server_default="0") for name in STAT_SUMS + LATENCY_COLUMNS),
)

# What each policy's answers turned out like, per model, task and temperature, per hour (relay.insights): the
# evidence behind GET /admin/policies/{id}/insights and `temperature.adaptive`. Written with the request log,
# in the same transaction, as additive upserts. `bucket` is the temperature sent upstream in hundredths,
# rounded to 0.05 (0: greedy; -1: none sent, the upstream's default); `source` who chose it: `default` (the
# policy's default or by_task), `retry` (a JSON retry) or `client`.
INSIGHT_SUMS = ("requests", "errors", "json_checked", "json_valid", "finish_length", "retries")
policy_insights = Table(
    "policy_insights", SQLModel.metadata,
    Column("policy_id", Integer, primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("task", String(20), primary_key=True),
    Column("source", String(10), primary_key=True),
    Column("bucket", Integer, primary_key=True),
    Column("start", UTCDateTime(), primary_key=True),
    *(Column(name, BigInteger, nullable=False, server_default="0") for name in INSIGHT_SUMS),
)
