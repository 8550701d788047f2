"""Admin API bodies: what comes in (validated) and what goes out (never a secret)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from admin.crud import redact_options
from channels.registry import channel_types

Name = Annotated[str, Field(min_length=1, max_length=200)]
NonNegative = Annotated[int, Field(ge=0)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- tenants -------------------------------------------------------------------------------------

class TenantCreate(_In):
    name: Name
    rpm: NonNegative | None = None
    tpm: NonNegative | None = None
    token_quota: NonNegative | None = None


class TenantUpdate(_In):
    name: Name | None = None
    status: Literal["active", "disabled"] | None = None
    rpm: NonNegative | None = None
    tpm: NonNegative | None = None
    token_quota: NonNegative | None = None


class TenantOut(_Out):
    id: int
    name: str
    status: str
    rpm: int | None
    tpm: int | None
    token_quota: int | None
    used_tokens: int
    created_at: datetime
    updated_at: datetime


# --- keys ----------------------------------------------------------------------------------------

class _KeyFields(_In):
    models: list[Annotated[str, Field(min_length=1)]] | None = None
    ip_allow: list[str] | None = None
    expires_at: datetime | None = None
    token_quota: NonNegative | None = None

    @field_validator("ip_allow")
    @classmethod
    def _cidrs(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        try:
            return [str(ipaddress.ip_network(n.strip(), strict=False)) for n in v]
        except ValueError as exc:
            raise ValueError(f"not an IP address or CIDR network: {exc}") from None

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return _as_utc(v)


class KeyCreate(_KeyFields):
    tenant_id: int
    name: Name = "default"


class KeyUpdate(_KeyFields):
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
    last_used_at: datetime | None
    created_at: datetime


class KeyCreated(KeyOut):
    key: str  # the secret: shown in this answer only


# --- channels ------------------------------------------------------------------------------------

class _ChannelFields(_In):
    base_url: Annotated[str, Field(max_length=1000)] | None = None
    api_key: str | None = None
    model_mapping: dict[str, str] | None = None
    priority: int | None = None
    weight: NonNegative | None = None
    timeout_s: Annotated[float, Field(gt=0, le=3600)] | None = None
    retries: Annotated[int, Field(ge=0, le=10)] | None = None
    options: dict[str, Any] | None = None
    capabilities: dict[str, Any] | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


def _known_type(v: str | None) -> str | None:
    if v is not None and v not in channel_types():
        raise ValueError(f"unknown channel type; known types: {', '.join(sorted(channel_types()))}")
    return v


class ChannelCreate(_ChannelFields):
    name: Name
    type: str
    models: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    status: Literal["enabled", "disabled"] = "enabled"

    _type = field_validator("type")(classmethod(lambda cls, v: _known_type(v)))


class ChannelUpdate(_ChannelFields):
    name: Name | None = None
    type: str | None = None
    models: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
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
    options: dict[str, Any]
    capabilities: dict[str, Any]
    last_test_at: datetime | None
    last_test_ok: bool | None
    last_test_latency_ms: float | None
    last_test_error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> ChannelOut:
        data = {k: getattr(row, k) for k in cls.model_fields if k != "has_api_key"}
        data["options"] = redact_options(row.options)
        return cls(**data, has_api_key=bool(row.api_key))
