"""Failover's two rules, for the pipeline: how often each channel is tried before the next, and what a client is
told when the last try failed."""

from __future__ import annotations

from collections.abc import Iterator

from channels.base import Channel, UpstreamError
from relay.admission import retry_headers
from relay.errors import APIError


def tries(channels: list[Channel], failures: list[UpstreamError]) -> Iterator[Channel]:
    """Each channel 1 + its `retries` times in a row, before failing over (the caller appends each failure);
    refused credentials are not retried: the same key will be refused again."""
    for channel in channels:
        for attempt in range(1 + max(channel.config.retries, 0)):
            if attempt and failures and failures[-1].kind == "upstream_auth":
                break
            yield channel


def client_error(exc: UpstreamError) -> APIError:
    if exc.status == 400:  # the upstream's own error, as it gave it
        return APIError(400, exc.message, exc.type or "invalid_request_error", exc.param,
                        exc.code or "upstream_rejected")
    if exc.status == 403:
        return APIError(403, exc.message, "invalid_request_error", exc.param, exc.kind)
    wait = retry_headers(exc.retry_after_s) if exc.retry_after_s is not None else {}
    if exc.status == 429:
        return APIError(429, exc.message, "rate_limit_error", None, exc.kind, headers=wait)
    if exc.kind in ("upstream_overloaded", "channel_busy"):
        return APIError(503, exc.message, "server_error", None, "overloaded", headers=wait or retry_headers(1.0))
    return APIError(exc.status, exc.message, "upstream_error", None, exc.kind)
