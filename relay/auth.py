"""Tenant API keys: generation, hashing, and the per-request checks (all in memory)."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

from relay.catalog import KeyInfo, Snapshot, TenantInfo
from relay.errors import APIError, forbidden, invalid_key
from relay.models import utcnow
from relay.usage import UsageRecorder

KEY_PREFIX = "sk-"


def new_secret() -> str:
    """256 random bits, URL-safe; the only copy leaves in the admin API's answer."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    # A plain SHA-256 is enough for 256-bit random secrets (no dictionary to attack), and it keeps
    # authentication off the CPU budget.
    return hashlib.sha256(secret.encode()).hexdigest()


def shown_prefix(secret: str) -> str:
    return secret[:10]


@dataclass(frozen=True)
class Principal:
    key: KeyInfo
    tenant: TenantInfo


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def presented_key(authorization: str | None, x_api_key: str | None, api_key_header: bool) -> str | None:
    """The Authorization value a request presents its key in; on Anthropic's endpoints (`api_key_header`) an
    x-api-key header stands in for a missing one (Anthropic's SDKs and Claude Code send that)."""
    if api_key_header and not authorization and x_api_key:
        return "Bearer " + x_api_key
    return authorization


def authenticate(snapshot: Snapshot, authorization: str | None, client_ip: str | None,
                 where: str = "the Authorization header (Authorization: Bearer YOUR_KEY)") -> Principal:
    token = bearer_token(authorization)
    if token is None:
        raise invalid_key(f"You didn't provide an API key. Provide it in {where}.")
    key = snapshot.keys_by_hash.get(hash_secret(token))
    if key is None:
        raise invalid_key(f"Incorrect API key provided: {token[:6]}****.")
    if not key.active:
        raise invalid_key("This API key has been revoked.")
    if key.expires_at is not None and key.expires_at <= utcnow():
        raise invalid_key("This API key has expired.")
    tenant = snapshot.tenants.get(key.tenant_id)
    if tenant is None or not tenant.active:
        raise invalid_key("The tenant of this API key is disabled.")
    if key.networks is not None and not _address_allowed(client_ip, key.networks):
        raise forbidden(f"Requests from {client_ip or 'this address'} are not allowed for this API key.")
    return Principal(key, tenant)


def _address_allowed(client_ip: str | None, networks: tuple) -> bool:
    if not client_ip:
        return False
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in networks)


def model_allowed(principal: Principal, model: str) -> bool:
    return principal.key.models is None or model in principal.key.models


def check_model(principal: Principal, model: str) -> None:
    if not model_allowed(principal, model):
        raise forbidden(f"This API key is not allowed to use the model `{model}`.", param="model")


def check_quota(principal: Principal, usage: UsageRecorder) -> None:
    tenant, key = principal.tenant, principal.key
    if tenant.token_quota is not None and usage.tenant_used(tenant.id) >= tenant.token_quota:
        raise APIError(429, "Your tenant has used its whole token quota; ask the operator to raise it.",
                         "insufficient_quota", None, "insufficient_quota")
    if key.token_quota is not None and usage.key_used(key.id) >= key.token_quota:
        raise APIError(429, "This API key has used its whole token quota; ask the operator to raise it.",
                         "insufficient_quota", None, "insufficient_quota")
