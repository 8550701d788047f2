"""The relay logic, one straight line: model access → policy → cache → routing → channel → log.
The HTTP layer (relay.api) parses and authenticates; this module never reaches back into it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from channels.base import Channel, UpstreamError
from relay.auth import Principal, check_model, check_quota
from relay.cache import CachePlan, ResponseCache, StreamAssembler, replay_chunks, replay_response, stored_from_response
from relay.cache import plan as cache_plan
from relay.catalog import Catalog
from relay.circuit import CircuitBreaker, auto_disable
from relay.errors import RelayError, not_found
from relay.limits import RateLimiter
from relay.policy import PolicyOutcome, apply_policy, cooler, is_greedy, json_answer_ok, wants_json_retry
from relay.routing import candidates
from relay.usage import UsageRecorder, clamp_tokens

log = logging.getLogger("relay.pipeline")

EMPTY_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def clean_usage(usage: Any) -> dict[str, Any]:
    """The upstream's usage with every count a sane integer (ONE API bills from it)."""
    if not isinstance(usage, dict):
        return dict(EMPTY_USAGE)
    out: dict[str, Any] = {k: clamp_tokens(usage.get(k, 0)) for k in EMPTY_USAGE}
    for key, value in usage.items():
        if key.endswith("_details") and isinstance(value, dict):
            out[key] = {k: clamp_tokens(v) for k, v in value.items() if isinstance(v, int | float)}
    return out


@dataclass
class RelayCall:
    endpoint: str  # "chat" | "completions"
    body: dict[str, Any]
    principal: Principal
    started: float = field(default_factory=time.perf_counter)
    task_header: str | None = None  # X-Relay-Task
    cache_control: str | None = None  # Cache-Control: no-cache skips the lookup, no-store the store


@dataclass
class RelayResult:
    headers: dict[str, str]
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None


@dataclass
class _Attempt:
    """What the log row needs to know about a call, filled in as the call goes."""

    call: RelayCall
    outcome: PolicyOutcome
    channel: Channel | None = None
    upstream_model: str | None = None
    upstream_ms: float = 0.0
    cache: str = "bypass"  # hit | miss | bypass
    # a cacheable miss: where to store the answer, and the single-flight lock to release afterwards
    store: CachePlan | None = None
    lock: str | None = None


class Pipeline:
    def __init__(self, catalog: Catalog, usage: UsageRecorder, cache: ResponseCache, limits: RateLimiter,
                 breaker: CircuitBreaker) -> None:
        self.catalog = catalog
        self.usage = usage
        self.cache = cache
        self.limits = limits
        self.breaker = breaker
        self._background: set[asyncio.Task] = set()

    async def run(self, call: RelayCall) -> RelayResult:
        attempt = _Attempt(call, PolicyOutcome(call.body))
        try:
            model = call.body["model"]
            check_model(call.principal, model)
            check_quota(call.principal, self.usage)
            await self.limits.admit(call.principal)
            attempt.outcome = apply_policy(self.catalog.snapshot.policies, call.body, call.principal.tenant.id,
                                           call.task_header)
            channels = self.catalog.snapshot.channels_by_model.get(model)
            if not channels:
                raise not_found(f"The model `{model}` does not exist or you do not have access to it.",
                                "model", "model_not_found")
            ordered = await self.breaker.usable(candidates(channels))
            cacheable = cache_plan(call.endpoint, attempt.outcome, call.principal.tenant.id, ordered,
                                   call.cache_control) if self.cache.enabled else None
            if cacheable is not None:
                stored = await self._lookup(attempt, cacheable, ordered)
                if stored is not None:
                    return self._hit(attempt, stored)
            if attempt.outcome.request.get("stream"):
                return await self._stream(attempt, ordered)
            return await self._complete(attempt, ordered)
        except RelayError as exc:
            await self._release(attempt)
            self._log(attempt, exc.status, error_type=exc.code or exc.type)
            raise
        except BaseException:
            await self._release(attempt)  # whatever went wrong, identical requests must not wait on us
            raise

    # --- cache ----------------------------------------------------------------------------------------

    async def _lookup(self, attempt: _Attempt, p: CachePlan, channels: list[Channel]) -> dict[str, Any] | None:
        """A stored answer, or None with the attempt set up as a miss (owning the single-flight lock)."""
        if p.lookup:
            stored = await self.cache.get(p.key)
            if stored is not None:
                return stored
        if p.store:
            lock_s = max((c.config.timeout_s for c in channels), default=60.0) + 5
            attempt.lock = await self.cache.acquire(p.key, lock_s)
            if attempt.lock is None and p.lookup and self.cache.enabled:
                # An identical request is being answered right now: take its answer instead of a second call.
                stored = await self.cache.wait_for(p.key, lock_s)
                if stored is not None:
                    return stored
                attempt.lock = await self.cache.acquire(p.key, lock_s)
            attempt.store = p if attempt.lock is not None else None
        attempt.cache = "miss" if self.cache.enabled else "bypass"
        return None

    def _hit(self, attempt: _Attempt, stored: dict[str, Any]) -> RelayResult:
        attempt.cache = "hit"
        usage = stored["usage"]
        headers = self._headers(attempt)
        headers["Server-Timing"] = f"relay;dur={self._log(attempt, 200, usage=usage):.3f}"
        model, body = attempt.call.body["model"], attempt.call.body
        if not body.get("stream"):
            return RelayResult(headers=headers, body=replay_response(stored, model))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def replay() -> AsyncIterator[bytes]:
            for chunk in replay_chunks(stored, model, include_usage):
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return RelayResult(headers=headers, stream=replay())

    async def _store(self, attempt: _Attempt, stored: dict[str, Any] | None) -> None:
        if attempt.store is not None and stored is not None:
            await self.cache.put(attempt.store, stored)
        await self._release(attempt)

    async def _release(self, attempt: _Attempt) -> None:
        if attempt.store is not None and attempt.lock is not None:
            await self.cache.release(attempt.store.key, attempt.lock)
            attempt.lock = None

    def reject(self, call: RelayCall, error: RelayError) -> None:
        """Logs a request refused before it reached the pipeline (an invalid body from a valid key)."""
        self._log(_Attempt(call, PolicyOutcome(call.body)), error.status, error_type=error.code or error.type)

    def _headers(self, attempt: _Attempt) -> dict[str, str]:
        headers = {"X-Relay-Policy": attempt.outcome.ref or "none",
                   "X-Relay-Rewrites": attempt.outcome.rewrites_header(),
                   "X-Relay-Cache": attempt.cache}
        if attempt.channel is not None:
            headers["X-Relay-Channel"] = attempt.channel.config.name
        return headers

    def _upstream_request(self, attempt: _Attempt, channel: Channel) -> dict[str, Any]:
        request = dict(attempt.outcome.request)
        request["model"] = attempt.upstream_model = channel.config.upstream_model(request["model"])
        if request.get("stream") and channel.config.capabilities.get("stream_usage", True):
            # Always ask for usage so the log and quota are exact; the client sees it only if it asked.
            request["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
        return request

    async def _complete(self, attempt: _Attempt, channels: list[Channel]) -> RelayResult:
        response = await self._call_channels(attempt, channels)
        usage = last_usage = clean_usage(response.get("usage"))
        headers: dict[str, str] = {}
        answer_ok = True
        if attempt.call.endpoint == "chat" and wants_json_retry(attempt.outcome):
            # response_format asks for JSON: a malformed answer is retried cooler, down to greedy.
            retry = attempt.outcome.rules.json_retry  # type: ignore[union-attr]
            tries = 1
            answer_ok = json_answer_ok(response, attempt.outcome.request)
            while not answer_ok and tries <= retry.attempts and not is_greedy(attempt.outcome.request):
                attempt.outcome = cooler(attempt.outcome, tries)
                response = await self._call_channels(attempt, channels)
                last_usage = clean_usage(response.get("usage"))
                usage = {k: usage[k] + last_usage[k] for k in EMPTY_USAGE}  # every attempt was paid for
                answer_ok = json_answer_ok(response, attempt.outcome.request)
                tries += 1
            headers["X-Relay-Json-Attempts"] = str(tries)
        response["model"] = attempt.call.body["model"]
        response["usage"] = usage
        # A hit later costs what this one answer cost; a JSON answer that never parsed is not kept.
        await self._store(attempt, stored_from_response(attempt.call.endpoint, response, last_usage)
                          if answer_ok else None)
        headers.update(self._headers(attempt))
        total_ms = self._log(attempt, 200, usage=usage)
        headers["Server-Timing"] = (f"upstream;dur={attempt.upstream_ms:.3f}, "
                                    f"relay;dur={total_ms - attempt.upstream_ms:.3f}")
        return RelayResult(headers=headers, body=response)

    async def _channel_failed(self, channel: Channel, exc: UpstreamError) -> bool:
        """Records the failure (circuit breaker, auto-disable on refused credentials); True to try the next
        channel, False when the request itself is at fault."""
        if not exc.retryable:
            return False
        log.warning("channel %s failed (%s): %s", channel.config.name, exc.kind, exc.message)
        if exc.kind == "upstream_auth":
            await auto_disable(self.catalog.engine, channel, exc.message)
            await asyncio.to_thread(self.catalog.reload)
        else:
            await self.breaker.failed(channel)
        return True

    async def _call_channels(self, attempt: _Attempt, channels: list[Channel]) -> dict[str, Any]:
        """The first channel that answers; retryable failures move on to the next one."""
        last: UpstreamError | None = None
        for channel in channels:
            attempt.channel = channel
            request = self._upstream_request(attempt, channel)
            t0 = time.perf_counter()
            try:
                if attempt.call.endpoint == "chat":
                    response = await channel.chat(request)
                else:
                    response = await channel.completion(request)
                await self.breaker.succeeded(channel)
                return response
            except UpstreamError as exc:
                last = exc
                if not await self._channel_failed(channel, exc):
                    break
            finally:
                attempt.upstream_ms += (time.perf_counter() - t0) * 1000
        assert last is not None
        raise _client_error(last)

    async def _stream(self, attempt: _Attempt, channels: list[Channel]) -> RelayResult:
        last: UpstreamError | None = None
        for channel in channels:
            attempt.channel = channel
            request = self._upstream_request(attempt, channel)
            chunks = (channel.chat_stream if attempt.call.endpoint == "chat" else channel.completion_stream)(
                request)
            try:
                # Nothing has reached the client yet, so a failure here can still be a clean HTTP error
                # (or, with failover, the next channel).
                first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except UpstreamError as exc:
                last = exc
                if await self._channel_failed(channel, exc):
                    continue
                break
            await self.breaker.succeeded(channel)
            return RelayResult(headers=self._headers(attempt), stream=self._sse(attempt, first, chunks))
        assert last is not None
        raise _client_error(last)

    async def _sse(self, attempt: _Attempt, first: dict[str, Any] | None,
                   chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        body = attempt.call.body
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        model = body["model"]
        usage: dict[str, Any] | None = None
        content_chunks = 0  # a stand-in for completion tokens when the stream ends without usage
        status, error_type = 200, None
        # A streamed JSON answer cannot be retried, so it is not stored either when the policy would retry.
        keep = attempt.store is not None and not wants_json_retry(attempt.outcome)
        assembler = StreamAssembler(attempt.call.endpoint) if keep else None
        try:
            chunk = first
            while chunk is not None:
                if assembler is not None:
                    assembler.add(chunk)
                if any(c.get("delta", {}).get("content") or c.get("text") for c in chunk.get("choices", [])):
                    content_chunks += 1
                if chunk.get("usage"):
                    usage = chunk["usage"] = clean_usage(chunk["usage"])
                    if not chunk.get("choices") and not wants_usage:
                        chunk = await anext(chunks, None)
                        continue
                    if not wants_usage:
                        chunk = {k: v for k, v in chunk.items() if k != "usage"}
                chunk["model"] = model
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                chunk = await anext(chunks, None)
            yield b"data: [DONE]\n\n"
        except UpstreamError as exc:
            status, error_type = exc.status, exc.kind
            yield b"data: " + orjson.dumps(_client_error(exc).body()) + b"\n\n"
        except Exception:
            log.exception("stream from channel %s broke", attempt.channel.config.name)
            status, error_type = 502, "stream_error"
            yield b"data: " + orjson.dumps(_client_error(UpstreamError(
                502, "The upstream stream broke off.", retryable=True)).body()) + b"\n\n"
        except BaseException:
            status, error_type = 499, "client_disconnected"  # cancelled: the client went away
            raise
        finally:
            await chunks.aclose()
            complete = status == 200 and assembler is not None
            with contextlib.suppress(Exception, asyncio.CancelledError):  # the cache never fails a stream
                await self._store(attempt, assembler.stored(usage) if complete else None)
            if usage is None:
                usage = {**EMPTY_USAGE, "completion_tokens": content_chunks, "total_tokens": content_chunks}
            self._log(attempt, status, usage=usage, error_type=error_type)

    def _log(self, attempt: _Attempt, status: int, *, usage: dict[str, Any] | None = None,
             error_type: str | None = None) -> float:
        call = attempt.call
        latency_ms = (time.perf_counter() - call.started) * 1000
        usage = usage or EMPTY_USAGE
        if status == 200:
            self.cache.stats[attempt.cache] += 1
        tokens = int(usage.get("total_tokens") or 0)  # a cut-off stream still spent what it streamed
        if tokens and (call.principal.key.tpm or call.principal.tenant.tpm):
            task = asyncio.create_task(self.limits.charge_tokens(call.principal, tokens))
            self._background.add(task)  # keep a reference until it is done
            task.add_done_callback(self._background.discard)
        self.usage.record({
            "tenant_id": call.principal.tenant.id, "key_id": call.principal.key.id,
            "endpoint": call.endpoint, "model": call.body["model"], "upstream_model": attempt.upstream_model,
            "channel_id": attempt.channel.config.id if attempt.channel else None,
            "stream": bool(call.body.get("stream")), "status_code": status, "error_type": error_type,
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "total_tokens": int(usage.get("total_tokens") or 0),
            "latency_ms": round(latency_ms, 3), "cache": attempt.cache, "policy": attempt.outcome.ref,
            "rewrites": attempt.outcome.rewrites or None,
        })
        return latency_ms


def _client_error(exc: UpstreamError) -> RelayError:
    if exc.status == 400:
        return RelayError(400, exc.message, "invalid_request_error", None, "upstream_rejected")
    if exc.status == 429:
        return RelayError(429, exc.message, "rate_limit_error", None, exc.kind)
    return RelayError(exc.status, exc.message, "upstream_error", None, exc.kind)
