"""Admin API bodies: what comes in (validated) and what goes out (never a secret)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from fastapi import Query
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from admin.crud import redact_options, redact_url
from channels.base import ChannelCapabilities
from channels.registry import channel_types
from relay.policy_rules import PRESETS, Rules

INT32_MAX = 2**31 - 1  # PostgreSQL INTEGER columns
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
NonNegative = Annotated[int, Field(ge=0, le=INT32_MAX)]
PerMinute = Annotated[int, Field(ge=1, le=INT32_MAX)]  # a rate limit; null (not 0) means none
Int32 = Annotated[int, Field(ge=-INT32_MAX, le=INT32_MAX)]
Tokens = Annotated[int, Field(ge=0, le=2**53)]
RowRef = Annotated[int, Field(ge=1, le=INT32_MAX)]
ModelName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]
FieldName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^(\*|[A-Za-z_][A-Za-z0-9_.-]*)$")]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Patch(_In):
    """PATCH bodies: a field left out stays; null is accepted only where the column may be null."""

    nullable: ClassVar[frozenset[str]] = frozenset()

    @field_validator("*", mode="after")
    @classmethod
    def _no_null(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name not in cls.nullable:
            raise ValueError("may not be null")
        return value


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59-14:00 is past the last datetime Python has
        raise ValueError("is out of range") from None


# A time from a client, in UTC; an overflow is a 400 like any other invalid value.
UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]
# A short text filter (query strings): no NUL, which PostgreSQL refuses with an error.
TextFilter = Annotated[str | None, Query(max_length=200, pattern=r"^[^\x00]*$")]


# --- tenants -------------------------------------------------------------------------------------

Priority = Annotated[int, Field(ge=1, le=1000)]


class TenantCreate(_In):
    name: Name
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None
    token_quota: Tokens | None = None
    priority: Priority | None = None  # weight of its share of a busy gateway's slots; unset: 1


class TenantUpdate(_Patch):
    nullable = frozenset({"rpm", "tpm", "token_quota", "priority"})
    name: Name | None = None
    status: Literal["active", "disabled"] | None = None
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None
    token_quota: Tokens | None = None
    priority: Priority | None = None


class TenantOut(_Out):
    id: int
    name: str
    status: str
    rpm: int | None
    tpm: int | None
    token_quota: int | None
    priority: int | None = None
    used_tokens: int
    created_at: datetime
    updated_at: datetime


# --- keys ----------------------------------------------------------------------------------------

class _KeyFields(_In):
    # null means every model / any address; an empty list is refused rather than read as either
    models: Annotated[list[ModelName], Field(min_length=1, max_length=10_000)] | None = None
    ip_allow: Annotated[list[str], Field(min_length=1, max_length=1_000)] | None = None
    expires_at: UtcDateTime | None = None
    token_quota: Tokens | None = None
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None

    @field_validator("ip_allow")
    @classmethod
    def _cidrs(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        try:
            return [str(ipaddress.ip_network(n.strip(), strict=False)) for n in v]
        except ValueError as exc:
            raise ValueError(f"not an IP address or CIDR network: {exc}") from None



class KeyCreate(_KeyFields):
    tenant_id: RowRef
    name: Name = "default"


class KeyBatch(KeyCreate):
    """POST /admin/keys/batch: `count` keys alike (a class, a customer), named `<name>-1` … `<name>-<count>`."""

    count: Annotated[int, Field(ge=1, le=1000)]
    name: Annotated[str, Field(min_length=1, max_length=190)] = "key"

    @model_validator(mode="after")
    def _bounded(self) -> KeyBatch:
        # Every key carries its own copy of the lists (in the database and in every process's memory).
        if self.count * (len(self.models or ()) + len(self.ip_allow or ())) > 100_000:
            raise ValueError("count × (models + ip_allow entries) may be at most 100,000")
        return self


class KeyUpdate(_KeyFields, _Patch):
    nullable = frozenset({"models", "ip_allow", "expires_at", "token_quota", "rpm", "tpm"})
    name: Name | None = None
    status: Literal["active", "revoked"] | None = None


class KeyOut(_Out):
    id: int
    tenant_id: int
    name: str
    prefix: str
    models: list[str] | None
    ip_allow: list[str] | None
    expires_at: datetime | None
    status: str
    token_quota: int | None
    used_tokens: int
    rpm: int | None
    tpm: int | None
    last_used_at: datetime | None
    created_at: datetime


class KeyCreated(KeyOut):
    key: str  # the secret: shown in this answer only


class KeysCreated(BaseModel):
    data: list[KeyCreated]  # every secret: shown in this answer only


# --- channels ------------------------------------------------------------------------------------

# What the operator declares about a channel's upstream, over its type's defaults (GET shows the result): every
# ChannelCapabilities field, optional, so a capability added there is accepted here without another list.
CapabilityOverrides = create_model(
    "CapabilityOverrides", __base__=_In,
    **{name: (field.annotation | None, None) for name, field in ChannelCapabilities.model_fields.items()})


class _ChannelFields(_In):
    base_url: Annotated[str, Field(max_length=1000)] | None = None
    api_key: str | None = None
    model_mapping: dict[str, str] | None = None
    priority: Int32 | None = None
    weight: NonNegative | None = None
    timeout_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    retries: Annotated[int, Field(ge=0, le=10)] | None = None
    max_inflight: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    options: dict[str, Any] | None = None
    capabilities: CapabilityOverrides | None = None

    passthrough: Annotated[list[FieldName], Field(max_length=200)] | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if any(ch.isspace() or ord(ch) < 32 for ch in v):
            raise ValueError("must not contain spaces or control characters")
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https"):
            raise ValueError("must start with http:// or https://")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        if not parts.hostname or port == 0:
            raise ValueError("must name a host (and a port from 1 to 65535, if any)")
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not carry credentials (they would be stored in plain text): put them in "
                             "api_key or options.extra_headers, which are encrypted")
        return v


def _known_type(v: str | None) -> str | None:
    if v is not None and v not in channel_types():
        raise ValueError(f"unknown channel type; known types: {', '.join(sorted(channel_types()))}")
    return v


class ChannelCreate(_ChannelFields):
    name: Name
    type: str
    models: Annotated[list[ModelName], Field(min_length=1)]
    status: Literal["enabled", "disabled", "auto_disabled"] = "enabled"

    _type = field_validator("type")(classmethod(lambda cls, v: _known_type(v)))


class ChannelUpdate(_ChannelFields, _Patch):
    nullable = frozenset({"base_url", "api_key", "passthrough", "max_inflight"})
    name: Name | None = None
    type: str | None = None
    models: Annotated[list[ModelName], Field(min_length=1)] | None = None
    status: Literal["enabled", "disabled", "auto_disabled"] | None = None

    _type = field_validator("type")(classmethod(lambda cls, v: _known_type(v)))


class ChannelOut(_Out):
    """No api_key: it is write-only. `has_api_key` says whether one is set."""

    id: int
    name: str
    type: str
    base_url: str | None
    has_api_key: bool
    models: list[str]
    model_mapping: dict[str, str]
    priority: int
    weight: int
    status: str
    timeout_s: float
    retries: int
    max_inflight: int | None = None
    options: dict[str, Any]
    capabilities: dict[str, Any]
    passthrough: list[str] | None
    last_test_at: datetime | None
    last_test_ok: bool | None
    last_test_latency_ms: float | None
    last_test_error: str | None
    probe: dict[str, Any] | None = None
    probed_at: datetime | None = None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> ChannelOut:
        data = {k: getattr(row, k) for k in cls.model_fields if k != "has_api_key"}
        data["options"] = redact_options(row.options or {})
        data["base_url"] = redact_url(row.base_url)
        kind = channel_types().get(row.type)
        data["capabilities"] = (kind.effective_capabilities(row.capabilities or {}).model_dump() if kind
                                else dict(row.capabilities or {}))
        return cls(**data, has_api_key=bool(row.api_key))


# --- policies ------------------------------------------------------------------------------------

PresetName = Literal[tuple(PRESETS)]  # named once, in relay.policy_rules


class PolicyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_pattern: ModelName
    tenant_id: RowRef | None = None
    priority: Int32 = 0
    rules: Rules | None = None
    preset: PresetName | None = None
    enabled: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> PolicyCreate:
        if (self.rules is None) == (self.preset is None):
            raise ValueError("give exactly one of `rules` and `preset`")
        return self


class PolicyUpdate(_Patch):
    nullable = frozenset({"tenant_id"})
    model_pattern: ModelName | None = None
    tenant_id: RowRef | None = None
    priority: Int32 | None = None
    rules: Rules | None = None
    preset: PresetName | None = None
    enabled: bool | None = None
