"""Settings from RELAY_* environment variables, read once per process."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


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
        )
