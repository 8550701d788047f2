"""Settings from RELAY_* environment variables, read once per process."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_QUEUE_TIMEOUT_MS = 500  # bench/overload_bench.py: admitted requests' p99 stays well under 1 s at 8× capacity
# A loop that keeps up lags 1-5 ms at p99 in bench/overload_bench.py's sweep: 10 ms is past that, and little for
# a request to wait before pacing begins
DEFAULT_LOOP_LAG_MS = 10
PROCESSES_ENV = "RELAY_PROCESSES"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw not in (None, "") else default


def _limit(raw: str) -> int | None:
    raw = raw.strip().lower()
    if raw in ("", "auto"):
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"RELAY_MAX_INFLIGHT must be `auto` or a whole number of at least 1, not {raw!r}")
    return int(raw)


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
    # API requests one gateway process serves at once (None: no limit), the event-loop lag above which new requests
    # are paced (relay.loop_guard; None: never), and how long a request may wait to start (relay.admission)
    max_inflight: int | None
    loop_lag_s: float | None
    queue_timeout_s: float
    body_timeout_s: float  # an API request's body must have arrived by then (relay.overload)
    processes: int  # gateway processes of this `serve` (set by its --workers): channel max_inflight is split among them
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
            max_inflight=_limit(os.environ.get("RELAY_MAX_INFLIGHT", "auto")),
            loop_lag_s=max(0.0, _float("RELAY_LOOP_LAG_MS", DEFAULT_LOOP_LAG_MS)) / 1000 or None,  # 0: never pace
            queue_timeout_s=max(0.0, _float("RELAY_QUEUE_TIMEOUT_MS", DEFAULT_QUEUE_TIMEOUT_MS) / 1000),
            body_timeout_s=max(0.1, _float("RELAY_BODY_TIMEOUT_S", 30.0)),
            processes=max(1, int(_float(PROCESSES_ENV, 1))),
            adaptive_every_s=max(_float("RELAY_ADAPTIVE_EVERY_S", 60.0), 0.1),
        )
