"""What an upstream's failure means, whichever client met it (litellm, or the direct OpenAI client): retryable
or the request's own fault, and what the client may be told. Messages are ours or the provider's filtered, so
a provider's words about credit or balance never reach ONE API (it would disable this relay)."""

from __future__ import annotations

from typing import Any

from channels.base import ONE_API_DISABLE_WORDS, UpstreamError

# Error codes (or types) with which an upstream says the relay's own key is bad, not the request.
CREDENTIAL_CODES = frozenset({"invalid_api_key", "account_deactivated", "invalid_authentication",
                              "authentication_error", "invalid_organization", "organization_deactivated"})


def safe_message(text: str | None, fallback: str = "The upstream rejected the request.") -> str:
    """A provider's message, one line, unless it carries words that would make ONE API disable this relay."""
    line = (str(text or "").strip().splitlines() or [""])[0][:500]
    if not line or any(word in line.lower() for word in ONE_API_DISABLE_WORDS):
        return fallback
    return line


def _field(error: dict[str, Any], name: str) -> str | None:
    value = error.get(name)
    return safe_message(str(value), "") or None if isinstance(value, str | int) else None


def retry_after(headers: Any) -> float | None:
    """Seconds from an answer's retry-after-ms (OpenAI's, read first) or Retry-After header, at most an hour; None
    when neither is there (or it is a date). `headers`: a case-insensitive mapping (aiohttp's, httpx's)."""
    for name, per_second in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name)) / per_second
        except (TypeError, ValueError, AttributeError):
            continue
        if seconds >= 0:
            return min(seconds, 3600.0)
    return None


def from_status(status: int | None, error: dict[str, Any], message: str | None = None,
                retry_after_s: float | None = None) -> UpstreamError:
    """An HTTP answer that was not a success, with the upstream's `error` object (possibly empty) and the seconds of
    its Retry-After header, if any."""
    text = error.get("message") if isinstance(error.get("message"), str) else message
    if status in (400, 413, 422):
        # The request's fault: the client gets the upstream's own error (message, type, param, code).
        return UpstreamError(400, safe_message(text), retryable=False, kind="invalid_request_error",
                             param=_field(error, "param"), type=_field(error, "type"), code=_field(error, "code"))
    if status == 401 or (status == 403 and {str(error.get("code")), str(error.get("type"))} & CREDENTIAL_CODES):
        return UpstreamError(502, "The upstream channel rejected the relay's credentials.", retryable=True,
                             kind="upstream_auth")
    if status == 403:
        # About this request (a model or feature the relay's key may not use): the client's 4xx, and no
        # reason to doubt the channel.
        return UpstreamError(403, f"The upstream refused this request: {safe_message(text)}", retryable=False,
                             kind="upstream_forbidden")
    if status == 404:
        return UpstreamError(502, "The upstream channel does not serve this model.", retryable=True,
                             kind="upstream_not_found")
    if status == 429:
        return UpstreamError(429, "The upstream channel is busy; retry shortly.", retryable=True,
                             kind="upstream_rate_limited", retry_after_s=retry_after_s)
    if status in (503, 529) and (retry_after_s is not None or error.get("code") == "overloaded" or status == 529):
        # At capacity, and saying so (our worker, vLLM-style servers, OpenAI, Anthropic's 529): another channel
        # may take the request; the channel itself is healthy, so its circuit does not count this.
        return UpstreamError(503, "The upstream channel is at capacity; retry shortly.", retryable=True,
                             kind="upstream_overloaded", retry_after_s=retry_after_s)
    return UpstreamError(502, f"The upstream channel failed (status {status or 'unknown'}).", retryable=True,
                         upstream_message=safe_message(text) if text else None)


def timeout() -> UpstreamError:
    return UpstreamError(504, "The upstream channel timed out.", retryable=True, kind="timeout")


def unreachable() -> UpstreamError:
    return UpstreamError(502, "Could not connect to the upstream channel.", retryable=True, kind="connect_error")
