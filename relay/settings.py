"""Settings from RELAY_* environment variables, read once per process."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


class SecretKeyError(RuntimeError):
    """The relay cannot get a usable key for upstream secrets; the message says what to do. Defined here, not in
    relay.secrets, so the command line can catch it without importing `cryptography` (a worker-only install)."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str | None
    admin_token: str | None
    host: str
    port: int
    # How often request logs and usage counters are flushed to the database, and how often the
    # in-memory configuration checks the database for edits made by other processes.
    log_flush_s: float
    config_poll_s: float
    # Reverse proxies whose X-Forwarded-For is believed (for IP allow-lists); empty: none, the socket's
    # peer address counts.
    trusted_proxies: str
    rate_burst_s: float  # rpm/tpm limits allow a burst of this many seconds' worth
    circuit_failures: int  # consecutive failures that open a channel's circuit
    circuit_cooldown_s: float  # how long an open circuit keeps the channel out of routing
    max_body_bytes: int  # request bodies above this are refused (413) while being read
    # Fernet keys (comma-separated, the first encrypts) for upstream secrets at rest; unset: see relay.secrets
    secret_key: str | None
    secret_key_file: str | None
    drain_timeout_s: float  # on SIGTERM, open streams get this long to finish
    # Completion tokens reserved against quotas and tpm when a request sets no max_tokens (and no policy caps it)
    output_estimate: int
    adaptive_every_s: float  # how often policies with temperature.adaptive are checked for a step (admin.adaptive)

    @classmethod
    def from_env(cls) -> Settings:
        redis_url = os.environ.get("RELAY_REDIS_URL", "redis://127.0.0.1:6379/0")
        return cls(
            database_url=os.environ.get("RELAY_DATABASE_URL") or "sqlite:///./policy-relay.db",
            redis_url=None if redis_url.strip().lower() in ("", "none", "off") else redis_url,
            admin_token=os.environ.get("RELAY_ADMIN_TOKEN") or None,
            host=os.environ.get("RELAY_HOST", "127.0.0.1"),
            port=int(os.environ.get("RELAY_PORT", "8080")),
            log_flush_s=_float("RELAY_LOG_FLUSH_S", 1.0),
            config_poll_s=_float("RELAY_CONFIG_POLL_S", 1.0),
            trusted_proxies=os.environ.get("RELAY_TRUSTED_PROXIES", "").strip(),
            rate_burst_s=_float("RELAY_RATE_BURST_S", 1.0),
            circuit_failures=int(_float("RELAY_CIRCUIT_FAILURES", 3)),
            circuit_cooldown_s=_float("RELAY_CIRCUIT_COOLDOWN_S", 30.0),
            max_body_bytes=int(_float("RELAY_MAX_BODY_MB", 16) * 1024 * 1024),
            secret_key=os.environ.get("RELAY_SECRET_KEY") or None,
            secret_key_file=os.environ.get("RELAY_SECRET_KEY_FILE") or None,
            drain_timeout_s=_float("RELAY_DRAIN_TIMEOUT_S", 30.0),
            output_estimate=int(_float("RELAY_QUOTA_OUTPUT_ESTIMATE", 1024)),
            adaptive_every_s=max(_float("RELAY_ADAPTIVE_EVERY_S", 60.0), 0.1),
        )
