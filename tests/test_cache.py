"""The Redis response cache through the real relay: what is cached, keys, replay as a stream, single-flight,
Cache-Control, TTL and modes from the policy, admin stats and purge, and Redis dying under traffic."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.conftest import add_fake_channel, run_relay
from tests.net import free_port

REDIS_DB_URL = "redis://127.0.0.1:6379/7"
ASK = [{"role": "user", "content": "What is the answer?"}]


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    redis.Redis.from_url(REDIS_DB_URL).flushdb()
    tmp = tmp_path_factory.mktemp("cache")
    with run_relay(f"sqlite:///{tmp / 'cache.db'}", tmp, env={"RELAY_REDIS_URL": REDIS_DB_URL}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["cached-model", "slow-400-model", "ttl-model", "always-model",
                                                      "off-model"])
        add_fake_channel(relay, upstream[1], "seeded", ["seeded-model"], capabilities={"seeded_determinism": True})
        yield relay


def _post(relay, key: str, headers: dict | None = None, raw: bytes | None = None, **body) -> httpx.Response:
    hdrs = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})}
    content = raw if raw is not None else json.dumps({"model": "cached-model", "messages": ASK, **body}).encode()
    return httpx.post(relay.url + "/v1/chat/completions", content=content, headers=hdrs, timeout=60)


def _unique() -> list[dict]:
    return [{"role": "user", "content": f"question {uuid.uuid4().hex}"}]


def test_greedy_requests_are_cached(relay, calls):
    key = relay.new_key()
    messages = _unique()
    first = _post(relay, key["key"], messages=messages, temperature=0)
    second = _post(relay, key["key"], messages=messages, temperature=0)
    assert first.headers["x-relay-cache"] == "miss" and second.headers["x-relay-cache"] == "hit"
    assert len(calls) == 1
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]  # usage is reported on a hit too
    rows = relay.logs(key["tenant_id"], want=2)
    assert sorted(r["cache"] for r in rows) == ["hit", "miss"]


@pytest.mark.parametrize(("model", "body", "cached"), [
    ("cached-model", {"temperature": 0.7}, False),
    ("cached-model", {}, False),  # no temperature: the upstream's default, not greedy
    ("cached-model", {"temperature": 0.7, "seed": 3}, False),  # this channel does not promise seeded determinism
    ("seeded-model", {"temperature": 0.7, "seed": 3}, True),
    ("cached-model", {"temperature": 0.9, "top_k": 1}, True),
])
def test_only_deterministic_requests_are_cached(relay, calls, model, body, cached):
    key = relay.new_key()["key"]
    messages = _unique()
    _post(relay, key, model=model, messages=messages, **body)
    again = _post(relay, key, model=model, messages=messages, **body)
    assert again.headers["x-relay-cache"] == ("hit" if cached else "bypass")
    assert len(calls) == (1 if cached else 2)


def test_key_ignores_spelling_but_not_content(relay, calls):
    key = relay.new_key()["key"]
    text = uuid.uuid4().hex
    a = ('{"model": "cached-model", "temperature": 0, "top_p": 1, '
         f'"messages": [{{"role": "user", "content": "{text}"}}]}}')
    b = (f'{{"messages": [{{"content": "{text}", "role": "user"}}], '
         '"top_p": 1.0, "temperature": 0.0, "model": "cached-model"}')
    assert _post(relay, key, raw=a.encode()).headers["x-relay-cache"] == "miss"
    assert _post(relay, key, raw=b.encode()).headers["x-relay-cache"] == "hit"
    two = [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]
    assert _post(relay, key, messages=two, temperature=0).headers["x-relay-cache"] == "miss"
    assert _post(relay, key, messages=two[::-1], temperature=0).headers["x-relay-cache"] == "miss"
    assert _post(relay, key, messages=two, temperature=0, tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}}}}]).headers["x-relay-cache"] == "miss"
    other_tenant = relay.new_key()["key"]
    assert _post(relay, other_tenant, raw=a.encode()).headers["x-relay-cache"] == "miss"
    assert len(calls) == 5


def test_stream_replay_and_streamed_miss(relay, calls):
    key = relay.new_key()["key"]
    client = relay.client(key)
    messages = _unique()
    plain = client.chat.completions.create(model="cached-model", messages=messages, temperature=0)
    raw = client.chat.completions.with_raw_response.create(model="cached-model", messages=messages, temperature=0,
                                                           stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-relay-cache"] == "hit"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # a streamed miss is assembled and stored
    other = _unique()
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="cached-model", messages=other, temperature=0, stream=True) if c.choices)
    hit = client.chat.completions.with_raw_response.create(model="cached-model", messages=other, temperature=0)
    assert hit.headers["x-relay-cache"] == "hit" and hit.parse().choices[0].message.content == streamed
    assert len(calls) == 2


def test_single_flight(relay, calls):
    """20 identical concurrent misses make exactly one upstream call; everyone gets its answer."""
    key = relay.new_key()["key"]
    messages = _unique()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: _post(relay, key, model="slow-400-model", messages=messages,
                                                temperature=0), range(20)))
    assert all(a.status_code == 200 for a in answers)
    assert len(calls) == 1
    assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1
    assert sorted(a.headers["x-relay-cache"] for a in answers) == ["hit"] * 19 + ["miss"]


def test_cache_control(relay, calls):
    key = relay.new_key()["key"]
    messages = _unique()
    _post(relay, key, messages=messages, temperature=0)
    assert _post(relay, key, {"Cache-Control": "no-cache"}, messages=messages, temperature=0).headers[
        "x-relay-cache"] == "miss"
    assert len(calls) == 2
    fresh = _unique()
    _post(relay, key, {"Cache-Control": "no-store"}, messages=fresh, temperature=0)
    assert _post(relay, key, messages=fresh, temperature=0).headers["x-relay-cache"] == "miss"


def test_policy_ttl_and_modes(relay, calls):
    relay.ok("POST", "/admin/policies", {"model_pattern": "ttl-model", "rules": {"cache": {"ttl_s": 1}}})
    relay.ok("POST", "/admin/policies", {"model_pattern": "always-model", "rules": {"cache": {"mode": "always"}}})
    relay.ok("POST", "/admin/policies", {"model_pattern": "off-model", "rules": {"cache": {"mode": "off"}}})
    time.sleep(0.2)
    key = relay.new_key()["key"]
    messages = _unique()
    _post(relay, key, model="ttl-model", messages=messages, temperature=0)
    assert _post(relay, key, model="ttl-model", messages=messages, temperature=0).headers["x-relay-cache"] == "hit"
    time.sleep(1.5)
    assert _post(relay, key, model="ttl-model", messages=messages, temperature=0).headers["x-relay-cache"] == "miss"
    _post(relay, key, model="always-model", messages=messages, temperature=1.2)
    assert _post(relay, key, model="always-model", messages=messages, temperature=1.2).headers[
        "x-relay-cache"] == "hit"
    _post(relay, key, model="off-model", messages=messages, temperature=0)
    assert _post(relay, key, model="off-model", messages=messages, temperature=0).headers[
        "x-relay-cache"] == "bypass"


def test_admin_stats_and_purge(relay):
    a, b = relay.new_key(), relay.new_key()
    messages = _unique()
    for key in (a, b):
        _post(relay, key["key"], messages=messages, temperature=0)
        _post(relay, key["key"], messages=messages, temperature=0)
    time.sleep(1.5)  # counters are flushed to Redis every second
    stats = relay.ok("GET", "/admin/cache")
    assert stats["redis"] == "up" and stats["hit"] >= 2 and stats["miss"] >= 2 and stats["entries"] >= 2
    time.sleep(2.5)  # no traffic: the counters stay as they are (they used to be re-added at every flush)
    again = relay.ok("GET", "/admin/cache")
    assert (again["hit"], again["miss"]) == (stats["hit"], stats["miss"])
    assert relay.ok("DELETE", f"/admin/cache?tenant_id={a['tenant_id']}")["purged"] >= 1
    assert _post(relay, a["key"], messages=messages, temperature=0).headers["x-relay-cache"] == "miss"
    assert _post(relay, b["key"], messages=messages, temperature=0).headers["x-relay-cache"] == "hit"
    assert relay.ok("DELETE", "/admin/cache?model=cached-model")["purged"] >= 1
    assert _post(relay, b["key"], messages=messages, temperature=0).headers["x-relay-cache"] == "miss"
    assert relay.ok("DELETE", "/admin/cache")["purged"] >= 1
    assert relay.ok("GET", "/admin/cache")["entries"] == 0
    purges = [e["after"] for e in relay.ok("GET", "/admin/audit?entity=cache")["data"] if e["action"] == "purge"]
    newest = [{k: p[k] for k in ("model", "tenant_id")} for p in purges[:3]]  # newest first
    assert newest == [{"model": None, "tenant_id": None}, {"model": "cached-model", "tenant_id": None},
                      {"model": None, "tenant_id": a["tenant_id"]}]
    assert all(p["purged"] >= 1 for p in purges[:3])


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_redis_killed_under_traffic(tmp_path, upstream):
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        with run_relay(f"sqlite:///{tmp_path / 'r.db'}", tmp_path,
                       env={"RELAY_REDIS_URL": f"redis://127.0.0.1:{port}/0"}) as relay:
            add_fake_channel(relay, upstream[1], "fake", ["cached-model"])
            key = relay.new_key()["key"]
            messages = _unique()
            statuses = []
            for i in range(60):
                if i == 20:
                    server.kill()
                    server.wait()
                answer = _post(relay, key, messages=messages, temperature=0)
                statuses.append((answer.status_code, answer.headers["x-relay-cache"]))
            assert all(status == 200 for status, _ in statuses)
            assert {c for _, c in statuses[:20]} == {"miss", "hit"} or statuses[0][1] == "miss"
            assert statuses[-1][1] == "bypass"
            assert "Redis unavailable" in relay.log_path.read_text()
    finally:
        server.kill()
