"""The response cache in Redis: which requests may be cached, their keys, single-flight, and replay.

Cacheable: deterministic after the policy's rewrite (greedy, or a fixed seed on channels that declare
seeded determinism), or anything when the policy's cache mode is `always`. The key is a SHA-256 over a
canonical JSON of the tenant namespace, the endpoint, the policy id@version and the rewritten request.
Redis trouble never fails a request: it is served uncached, with a warning and a counter."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from backends.wire import responses as wire
from channels.base import Channel
from relay.errors import APIError
from relay.policy import PolicyOutcome
from relay.redis_state import RedisState

log = logging.getLogger("relay.cache")

DEFAULT_TTL_S = 3600
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# What does not change the answer: how it is delivered, and who asked.
_NOT_IN_KEY = frozenset({"stream", "stream_options", "user", "metadata", "encoding_format"})


@dataclass(frozen=True)
class CachePlan:
    key: str
    model: str
    tenant_id: int
    ttl_s: int
    lookup: bool  # Cache-Control: no-cache skips it
    store: bool  # Cache-Control: no-store skips it


def deterministic(request: dict[str, Any], channels: list[Channel]) -> bool:
    if request.get("temperature") == 0 or request.get("top_k") == 1 or request.get("do_sample") is False:
        return True
    seeded = request.get("seed") is not None
    return seeded and all(c.capabilities.seeded_determinism for c in channels)


def _canonical(value: Any) -> Any:
    """1 and 1.0, key order, and any float spelling map to one form."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:  # beyond: keep it a float
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


# What a client writes, not how it samples: taken as it came (orjson sorts its keys at C speed) instead of walked
# value by value — a walk of 300,000 token ids held the event loop for every tenant.
_CONTENT = frozenset({"messages", "prompt", "input"})


def cache_key(namespace: str, endpoint: str, outcome: PolicyOutcome) -> str:
    request = {k: v if k in _CONTENT else _canonical(v) for k, v in outcome.request.items() if k not in _NOT_IN_KEY}
    payload = {"ns": namespace, "endpoint": endpoint, "policy": outcome.ref, "request": request}
    digest = hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return "v1:" + digest  # ResponseCache puts the deployment's prefix in front


def plan(endpoint: str, outcome: PolicyOutcome, tenant_id: int, channels: list[Channel],
         cache_control: str | None) -> CachePlan | None:
    rule = outcome.rules.cache if outcome.rules is not None else None
    mode = rule.mode if rule is not None else "deterministic"
    fixed = endpoint == "embeddings" or deterministic(outcome.request, channels)  # an embedding never samples
    if mode == "off" or (mode == "deterministic" and not fixed):
        return None
    directives = {d.strip().lower() for d in (cache_control or "").split(",")}
    namespace = (rule.namespace if rule is not None and rule.namespace else None) or f"tenant:{tenant_id}"
    return CachePlan(key=cache_key(namespace, endpoint, outcome), model=outcome.request["model"],
                     tenant_id=tenant_id, ttl_s=rule.ttl_s if rule is not None else DEFAULT_TTL_S,
                     lookup="no-cache" not in directives, store="no-store" not in directives)


class ResponseCache:
    def __init__(self, state: RedisState) -> None:
        self.state = state
        self.redis = state.client
        self.prefix = state.prefix + "cache:"
        self.stats: Counter[str] = Counter()  # hit / miss / bypass, this process, not yet flushed

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    async def _call(self, operation) -> Any:
        return await self.state.call(operation)

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._call(lambda: self.redis.get(self.prefix + key))
        return orjson.loads(raw) if raw else None

    async def put(self, p: CachePlan, stored: dict[str, Any]) -> None:
        async def write() -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.prefix + p.key, orjson.dumps(stored), ex=p.ttl_s)
            for index in (f"{self.prefix}idx:model:{p.model}", f"{self.prefix}idx:tenant:{p.tenant_id}"):
                pipe.sadd(index, self.prefix + p.key)
                pipe.expire(index, max(p.ttl_s, DEFAULT_TTL_S))
            await pipe.execute()

        await self._call(write)

    async def acquire(self, key: str, ttl_s: float) -> str | None:
        """Single-flight: the first of identical misses gets a token and calls the upstream."""
        token = secrets.token_hex(8)
        ok = await self._call(lambda: self.redis.set(self.prefix + key + ":lock", token, nx=True,
                                                     px=int(ttl_s * 1000)))
        return token if ok else None

    async def release(self, key: str, token: str) -> None:
        await self._call(lambda: self.redis.eval(_RELEASE, 1, self.prefix + key + ":lock", token))

    async def wait_for(self, key: str, timeout_s: float) -> dict[str, Any] | None:
        """Another request is fetching this answer: wait for it (or for its lock to go away)."""
        async def value_and_lock() -> list:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.prefix + key)
            pipe.exists(self.prefix + key + ":lock")
            return await pipe.execute()

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.enabled:
            await asyncio.sleep(0.02)
            result = await self._call(value_and_lock)
            if result is None:
                return None
            value, locked = result
            if value:
                return orjson.loads(value)
            if not locked:
                return None
        return None

    async def flush_stats(self) -> None:
        counts = Counter(self.stats)  # the same Counter object stays: accounting holds it
        self.stats.clear()
        if not counts or self.redis is None:
            return
        async def write() -> bool:
            pipe = self.redis.pipeline(transaction=False)
            for name, n in counts.items():
                pipe.hincrby(self.prefix + "stats", name, n)
            await pipe.execute()
            return True

        if await self._call(write) is None:
            self.stats.update(counts)  # keep them for the next flush

    async def summary(self) -> dict[str, Any]:
        async def read():
            stats = await self.redis.hgetall(self.prefix + "stats")
            keys = 0
            async for key in self.redis.scan_iter(match=self.prefix + "v1:*", count=1000):
                keys += not key.endswith(b":lock")
            return {k.decode(): int(v) for k, v in stats.items()}, keys
        result = await self._call(read)
        if result is None:
            return {"redis": "unavailable" if self.redis else "off", "redis_errors": self.state.errors,
                    "this_process": dict(self.stats)}
        stats, keys = result
        for name, n in self.stats.items():
            stats[name] = stats.get(name, 0) + n
        return {"redis": "up", "entries": keys, "redis_errors_this_process": self.state.errors,
                **{k: stats.get(k, 0) for k in ("hit", "miss", "bypass")}}

    async def purge(self, model: str | None = None, tenant_id: int | None = None) -> int:
        async def run() -> int:
            if model is None and tenant_id is None:
                keys = [k async for k in self.redis.scan_iter(match=self.prefix + "*", count=1000)
                        if not k.endswith(b"stats")]
            else:
                index = (f"{self.prefix}idx:model:{model}" if model is not None
                         else f"{self.prefix}idx:tenant:{tenant_id}")
                keys = [*await self.redis.smembers(index), index.encode()]
            removed = 0
            for i in range(0, len(keys), 500):
                removed += await self.redis.delete(*keys[i:i + 500])
            return removed
        result = await self._call(run)
        if result is None:
            raise APIError(503, "The cache (Redis) is unavailable; nothing was purged.", "server_error")
        return result



# --- what is stored, and how a hit is replayed -------------------------------------------------------

def stored_from_response(endpoint: str, response: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    if endpoint == "embeddings":  # the vectors as floats: each hit answers in the encoding its client asks for
        return {"endpoint": endpoint, "vectors": embedding_vectors(response), "usage": usage}
    return {"endpoint": endpoint, "choices": response.get("choices", []), "usage": usage,
            "system_fingerprint": response.get("system_fingerprint")}


def embedding_vectors(response: dict[str, Any]) -> list[list[float]]:
    """An upstream's /v1/embeddings answer as float vectors in input order (base64 ones unpacked)."""
    data = sorted(response.get("data") or [], key=lambda d: d.get("index", 0))
    return [wire.decode_vector(d.get("embedding") or []) for d in data]


class StreamAssembler:
    """Builds the stored answer of a streamed miss from its chunks; gives up on what it cannot rebuild."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.choices: dict[int, dict[str, Any]] = {}
        self.usable = True

    def add(self, chunk: dict[str, Any]) -> None:
        for c in chunk.get("choices", []):
            entry = self.choices.setdefault(c.get("index", 0), {"content": "", "finish_reason": None})
            delta = c.get("delta") or {}
            if delta.get("tool_calls") or delta.get("function_call") or c.get("logprobs"):
                self.usable = False  # partial structures; not worth reassembling
            entry["content"] += delta.get("content") or c.get("text") or ""
            entry["finish_reason"] = c.get("finish_reason") or entry["finish_reason"]

    def stored(self, usage: dict[str, Any] | None) -> dict[str, Any] | None:
        if not self.usable or not self.choices or usage is None or any(
                c["finish_reason"] is None for c in self.choices.values()):
            return None
        chat = self.endpoint == "chat"
        choices = [{"index": i, "finish_reason": c["finish_reason"],
                    **({"message": {"role": "assistant", "content": c["content"]}} if chat else {"text": c["content"]})}
                   for i, c in sorted(self.choices.items())]
        return {"endpoint": self.endpoint, "choices": choices, "usage": usage}


def replay_response(stored: dict[str, Any], model: str, encoding: str | None = None) -> dict[str, Any]:
    if stored["endpoint"] == "embeddings":
        return wire.embedding_list(model, stored["vectors"], stored["usage"]["prompt_tokens"], encoding)
    chat = stored["endpoint"] == "chat"
    out = wire.response(wire.head(chat, model), chat, stored["choices"], stored["usage"])
    if stored.get("system_fingerprint"):
        out["system_fingerprint"] = stored["system_fingerprint"]
    return out


def replay_chunks(stored: dict[str, Any], model: str, include_usage: bool) -> list[dict[str, Any]]:
    """A cached answer as OpenAI stream chunks: role, the whole text, the finish reason, then usage."""
    chat = stored["endpoint"] == "chat"
    head = wire.head(chat, model)
    chunks = []
    for choice in stored["choices"]:
        i, finish = choice.get("index", 0), choice.get("finish_reason")
        if chat:
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
            if message.get("tool_calls"):
                delta["tool_calls"] = [{**call, "index": n} for n, call in enumerate(message["tool_calls"])]
            chunks.append(wire.chunk(head, chat, [{"index": i, "delta": delta, "finish_reason": None}]))
            chunks.append(wire.chunk(head, chat, [{"index": i, "delta": {}, "finish_reason": finish}]))
        else:
            text = choice.get("text") or ""
            chunks.append(wire.chunk(head, chat, [{"index": i, "text": text, "finish_reason": None}]))
            chunks.append(wire.chunk(head, chat, [{"index": i, "text": "", "finish_reason": finish}]))
    if include_usage:
        chunks.append(wire.chunk(head, chat, [], stored["usage"]))
    return chunks
