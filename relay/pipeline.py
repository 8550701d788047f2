"""The relay logic, one straight line: model access → policy → admission (quotas, limits) → cache → routing →
channel → accounting. The HTTP layer (relay.api) parses and authenticates; this module never reaches back
into it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from channels.base import Channel, UpstreamError
from relay.accounting import Accounting, Entry, clean_usage, generated_text, total_usage, unreported_usage
from relay.auth import Principal, check_model
from relay.cache import CachePlan, ResponseCache, StreamAssembler, replay_chunks, replay_response, stored_from_response
from relay.cache import plan as cache_plan
from relay.catalog import Catalog
from relay.dispatch import Dispatcher
from relay.errors import APIError, not_found
from relay.failover import client_error
from relay.insights import StreamWatch, insight, noter
from relay.lifecycle import Drain, DrainTimeout
from relay.passthrough import upstream_request
from relay.policy import PolicyOutcome, Try, apply_policy, json_retry, rewrites_header, wants_json_retry
from relay.routing import candidates

log = logging.getLogger("relay.pipeline")


@dataclass
class RelayCall:
    endpoint: str  # "chat" | "completions" | "embeddings"
    body: dict[str, Any]
    principal: Principal
    started: float = field(default_factory=time.perf_counter)
    task_header: str | None = None  # X-Relay-Task
    cache_control: str | None = None  # Cache-Control: no-cache skips the lookup, no-store the store
    body_bytes: int = 0
    surface: str | None = None  # the API the client spoke, when it was translated to `endpoint` (responses, messages)
    present: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # a whole answer, translated for that API


@dataclass
class RelayResult:
    """An answer, or a stream of lists of OpenAI chunk dicts (the chunks that arrived together; the last may be
    an error event); the HTTP layer frames each list as server-sent events in one write."""

    headers: dict[str, str]
    body: dict[str, Any] | None = None
    stream: AsyncIterator[list[dict[str, Any]]] | None = None


@dataclass
class _Attempt:
    """One request on its way: its policy outcome, the channel answering, its cache plan and its log row."""

    call: RelayCall
    outcome: PolicyOutcome
    entry: Entry
    channel: Channel | None = None
    upstream_ms: float = 0.0
    dropped: list[dict[str, Any]] = field(default_factory=list)  # fields the channel may not receive
    # a cacheable miss: where to store the answer, and the single-flight lock to release afterwards
    store: CachePlan | None = None
    lock: str | None = None
    holding: Channel | None = None  # the channel whose in-flight slot its stream holds until it ends
    finished: bool = False  # its log row is written


class Pipeline:
    def __init__(self, catalog: Catalog, accounting: Accounting, cache: ResponseCache, dispatch: Dispatcher,
                 drain: Drain) -> None:
        self.catalog = catalog
        self.accounting = accounting
        self.cache = cache
        self.dispatch = dispatch
        self.drain = drain
        self._cleanups: set[asyncio.Task] = set()  # clean-ups of streams whose client left before they began

    async def run(self, call: RelayCall) -> RelayResult:
        attempt = _Attempt(call, PolicyOutcome(call.body), Entry(call.principal, call.surface or call.endpoint,
                                                                 call.body["model"], bool(call.body.get("stream")),
                                                                 call.started))
        try:
            model = call.body["model"]
            check_model(call.principal, model)
            attempt.outcome = apply_policy(self.catalog.snapshot.policy_index, call.body, call.principal.tenant.id,
                                           call.task_header, call.endpoint)
            channels = self.catalog.snapshot.channels_by_model.get(model)
            if not channels:
                raise not_found(f"The model `{model}` does not exist or you do not have access to it.",
                                "model", "model_not_found")
            retries = attempt.outcome.rules.json_retry.attempts if wants_json_retry(attempt.outcome) else 0
            admission = attempt.entry.admission = await self.accounting.admit(
                call.principal, call.endpoint, attempt.outcome.request, call.body_bytes, calls=1 + retries)
            if admission.cap is not None:
                attempt.outcome = attempt.outcome.with_value("max_tokens", admission.cap, "quota.reservation")
            ordered = await self.dispatch.breaker.usable(candidates(channels))
            cacheable = cache_plan(call.endpoint, attempt.outcome, call.principal.tenant.id, ordered,
                                   call.cache_control) if self.cache.enabled else None
            if cacheable is not None:
                stored = await self._lookup(attempt, cacheable, ordered)
                if stored is not None:
                    return self._hit(attempt, stored)
            if attempt.outcome.request.get("stream"):
                return await self._stream(attempt, ordered)
            return await self._complete(attempt, ordered)
        except APIError as exc:
            await self._release(attempt)
            self._finish(attempt, exc.status, error_type=exc.code or exc.type)
            raise
        except asyncio.CancelledError:
            await self._release(attempt)  # identical requests must not wait on us
            self._finish(attempt, 499, usage=await self._unreported(attempt, []), error_type="client_disconnected")
            raise
        except Exception:
            await self._release(attempt)
            self._finish(attempt, 500, error_type="internal_error")  # no request goes unlogged
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
        attempt.entry.cache = "miss" if self.cache.enabled else "bypass"
        return None

    def _hit(self, attempt: _Attempt, stored: dict[str, Any]) -> RelayResult:
        attempt.entry.cache = "hit"
        usage = stored["usage"]
        headers = self._headers(attempt)
        model, body = attempt.call.body["model"], attempt.call.body
        if not body.get("stream"):
            answer = self._present(attempt, replay_response(stored, model, body.get("encoding_format")), usage)
            headers["Server-Timing"] = f"relay;dur={self._finish(attempt, 200, usage=usage):.3f}"
            return RelayResult(headers=headers, body=answer)
        headers["Server-Timing"] = f"relay;dur={self._finish(attempt, 200, usage=usage):.3f}"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def replay() -> AsyncIterator[list[dict[str, Any]]]:
            yield replay_chunks(stored, model, include_usage)  # all at once: one write

        return RelayResult(headers=headers, stream=replay())

    async def _store(self, attempt: _Attempt, stored: dict[str, Any] | None) -> None:
        if attempt.store is not None and stored is not None:
            await self.cache.put(attempt.store, stored)
        await self._release(attempt)

    async def _release(self, attempt: _Attempt) -> None:
        if attempt.store is not None and attempt.lock is not None:
            await self.cache.release(attempt.store.key, attempt.lock)
            attempt.lock = None

    # --- logging --------------------------------------------------------------------------------------

    def reject(self, call: RelayCall, error: APIError) -> None:
        """Logs a request refused before it reached the pipeline (an invalid body from a valid key)."""
        entry = Entry(call.principal, call.endpoint, call.body["model"], False, call.started)
        self.accounting.finish(entry, error.status, error_type=error.code or error.type)

    def _finish(self, attempt: _Attempt, status: int, *, usage: dict[str, Any] | None = None,
                error_type: str | None = None) -> float:
        if attempt.finished:
            return 0.0
        attempt.finished = True
        entry = attempt.entry
        entry.policy = attempt.outcome.ref
        entry.rewrites = attempt.outcome.rewrites + attempt.dropped
        entry.insight = insight(attempt.outcome, entry, status, error_type)
        return self.accounting.finish(entry, status, usage, error_type)

    def _headers(self, attempt: _Attempt) -> dict[str, str]:
        headers = {"X-Relay-Policy": attempt.outcome.ref or "none",
                   "X-Relay-Rewrites": rewrites_header(attempt.outcome.rewrites + attempt.dropped),
                   "X-Relay-Cache": attempt.entry.cache}
        if attempt.channel is not None:  # an operator may name a channel in any script: headers carry ASCII
            headers["X-Relay-Channel"] = quote(attempt.channel.config.name, safe=" _.-()[]@+")
        return headers

    # --- dispatch -------------------------------------------------------------------------------------

    def _upstream_request(self, attempt: _Attempt, channel: Channel) -> dict[str, Any]:
        request, attempt.dropped = upstream_request(attempt.call.endpoint, attempt.outcome, channel)
        attempt.entry.channel_id, attempt.entry.upstream_model = channel.config.id, request["model"]
        return request

    async def _complete(self, attempt: _Attempt, channels: list[Channel]) -> RelayResult:
        response = await self._call_channels(attempt, channels)
        headers: dict[str, str] = {}
        tried: list[Try] = [(attempt.outcome, response, None)]
        constrained = attempt.channel is not None and attempt.channel.capabilities.constrained_decoding
        if attempt.call.endpoint == "chat" and wants_json_retry(attempt.outcome) and not constrained:
            async def ask(outcome: PolicyOutcome) -> dict[str, Any]:
                attempt.outcome = outcome
                return await self._call_channels(attempt, channels)

            tried = await json_retry(attempt.outcome, response, ask, noter(attempt.outcome, attempt.entry.observations))
            attempt.outcome, response, _ = tried[-1]
            headers["X-Relay-Json-Attempts"] = str(len(tried))
        else:
            noter(attempt.outcome, attempt.entry.observations)(tried[0])
        answers, answer_ok = [t[1] for t in tried], tried[-1][2] is not False
        usages = [clean_usage(a.get("usage")) for a in answers]
        usage = total_usage(usages)  # every attempt was paid for
        # A hit later costs what this one answer cost; a JSON answer that never parsed is not kept.
        stored = stored_from_response(attempt.call.endpoint, response, usages[-1]) if answer_ok else None
        if attempt.call.endpoint == "embeddings":
            response = replay_response(stored, attempt.call.body["model"], attempt.call.body.get("encoding_format"))
        else:
            response["model"] = attempt.call.body["model"]
            response["usage"] = usage
        response = self._present(attempt, response, usage)  # first: an answer it refuses is not cached either
        await self._store(attempt, stored)
        headers.update(self._headers(attempt))
        total_ms = self._finish(attempt, 200, usage=usage)
        headers["Server-Timing"] = (f"upstream;dur={attempt.upstream_ms:.3f}, "
                                    f"relay;dur={total_ms - attempt.upstream_ms:.3f}")
        return RelayResult(headers=headers, body=response)

    def _present(self, attempt: _Attempt, answer: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
        """The answer in the client's API. One that API cannot express (a tool call whose arguments are no JSON,
        for Anthropic's `input`) is a 502, logged as one and billed: the upstream did the work."""
        if attempt.call.present is None:
            return answer
        try:
            return attempt.call.present(answer)
        except Exception as exc:
            log.warning("answer of channel %s not translatable for %s: %s", attempt.channel and
                        attempt.channel.config.name, attempt.call.surface, str(exc).splitlines()[0][:300])
            self._finish(attempt, 502, usage=usage, error_type="untranslatable_answer")
            raise APIError(502, f"The upstream's answer cannot be expressed in this API ({type(exc).__name__}); "
                                "retry, or use /v1/chat/completions.", "upstream_error", None,
                           "untranslatable_answer") from None

    def _prepare(self, attempt: _Attempt) -> Callable[[Channel], dict[str, Any]]:
        def prepare(channel: Channel) -> dict[str, Any]:
            attempt.channel = channel
            return self._upstream_request(attempt, channel)

        return prepare

    async def _call_channels(self, attempt: _Attempt, channels: list[Channel]) -> dict[str, Any]:
        response, upstream_s = await self.dispatch.answer(attempt.call.endpoint, channels, self._prepare(attempt))
        attempt.upstream_ms += upstream_s * 1000
        return response

    async def _stream(self, attempt: _Attempt, channels: list[Channel]) -> RelayResult:
        channel, first, chunks = await self.dispatch.stream(attempt.call.endpoint, channels, self._prepare(attempt))
        attempt.holding = channel
        self.accounting.metrics.first_byte(attempt.entry.endpoint, attempt.entry.model,
                                           time.perf_counter() - attempt.call.started)
        # A stream nobody iterates (its client left before the answer started) never runs its generator's clean-up:
        # the end of the request's task does it then.
        asyncio.current_task().add_done_callback(lambda _: self._abandoned(attempt, chunks))
        return RelayResult(headers=self._headers(attempt), stream=self._relay_stream(attempt, first, chunks))

    def _let_go(self, attempt: _Attempt) -> None:
        if attempt.holding is not None:
            self.dispatch.slots.give(attempt.holding)
            attempt.holding = None

    def _abandoned(self, attempt: _Attempt, chunks: AsyncIterator[Any]) -> None:
        if attempt.holding is None:
            return  # the stream ended and cleaned up
        self._let_go(attempt)

        async def close() -> None:
            with contextlib.suppress(Exception):
                await chunks.aclose()
                await self._release(attempt)
            self._finish(attempt, 499, usage=await self._unreported(attempt, []), error_type="client_disconnected")

        task = asyncio.ensure_future(close())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _unreported(self, attempt: _Attempt, sent: list[str]) -> dict[str, Any] | None:
        """The bill of a call that ended without the upstream's usage (cut short, or a stream without it), once an
        upstream had it: the prompt it read and the text `sent` to the client."""
        if attempt.entry.channel_id is None:
            return None
        with contextlib.suppress(Exception, asyncio.CancelledError):
            return await unreported_usage(attempt.entry, attempt.call.endpoint, attempt.outcome.request,
                                          attempt.call.body_bytes, sent)
        return None

    async def _relay_stream(self, attempt: _Attempt, first: list[dict[str, Any]] | None,
                            chunks: AsyncIterator[list[dict[str, Any]]]) -> AsyncIterator[list[dict[str, Any]]]:
        """The client's chunks, a list per upstream batch (what arrived together leaves together)."""
        body = attempt.call.body
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        model = body["model"]
        usage: dict[str, Any] | None = None
        sent: list[str] = []  # what reached the client: billed if the stream ends without usage
        status, error_type = 200, None
        # A streamed JSON answer cannot be retried, so it is not stored either when the policy would retry.
        keep = attempt.store is not None and not wants_json_retry(attempt.outcome)
        assembler = StreamAssembler(attempt.call.endpoint) if keep else None
        watch = StreamWatch(attempt.outcome) if attempt.outcome.ref is not None else None
        try:
            batch = first
            while batch is not None:
                out = []
                for chunk in batch:
                    if assembler is not None:
                        assembler.add(chunk)
                    if watch is not None:
                        watch.add(chunk)
                    sent.extend(generated_text(chunk))
                    if chunk.get("usage"):
                        usage = chunk["usage"] = clean_usage(chunk["usage"])
                        if not chunk.get("choices") and not wants_usage:
                            continue
                        if not wants_usage:
                            chunk = {k: v for k, v in chunk.items() if k != "usage"}
                    chunk["model"] = model
                    out.append(chunk)
                if out:
                    yield out
                batch = await self.drain.next(chunks)
        except UpstreamError as exc:
            status, error_type = exc.status, exc.kind
            yield [client_error(exc).body()]
        except DrainTimeout:
            status, error_type = 503, "shutting_down"
            yield [APIError(503, "The relay is restarting and ended this stream early; retry the request.",
                            "server_error", None, "shutting_down").body()]
        except Exception:
            log.exception("stream from channel %s broke", attempt.channel.config.name)
            status, error_type = 502, "stream_error"
            yield [client_error(UpstreamError(502, "The upstream stream broke off.", retryable=True)).body()]
        except BaseException:
            status, error_type = 499, "client_disconnected"  # cancelled: the client went away
            raise
        finally:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await chunks.aclose()  # cancellation reaches the upstream: its connection is closed
            self._let_go(attempt)
            complete = status == 200 and assembler is not None
            with contextlib.suppress(Exception, asyncio.CancelledError):  # the cache never fails a stream
                await self._store(attempt, assembler.stored(usage) if complete else None)
            if watch is not None and status == 200:
                attempt.entry.observations.append(watch.observation())  # judged later, by the log writer
            if usage is None:
                usage = await self._unreported(attempt, sent)
            self._finish(attempt, status, usage=usage, error_type=error_type)
