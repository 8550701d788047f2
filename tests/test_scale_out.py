"""Scale-out on one machine: two `serve` processes on different ports sharing one PostgreSQL database and one
Redis, and a load generator alternating between them. Rate limits, token quotas, the response cache and the
circuit breaker hold across both; an admin edit made through one is obeyed by the other within
RELAY_CONFIG_POLL_S (at once through the Redis nudge, and by polling the config version when nobody nudges)."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, SECRET_KEY, Relay, add_fake_channel, postgres_database, run_relay

REDIS_URL = "redis://127.0.0.1:6379/15"
POLL_S = 0.5  # RELAY_CONFIG_POLL_S, as run_relay sets it
EDIT_BOUND_S = 2 * POLL_S + 1  # an edit must be obeyed everywhere within this, and no wait beyond it is needed
RPM = 6
ENV = {"RELAY_REDIS_URL": REDIS_URL, "RELAY_CONFIG_POLL_S": str(POLL_S),
       # A burst of a whole minute's worth: `rpm` requests pass at once, then one per 60/rpm s (GCRA, no window
       # boundary), so "exactly rpm of 2*rpm" holds for any load that takes less than 60/rpm s.
       "RELAY_RATE_BURST_S": "60",
       "RELAY_CIRCUIT_FAILURES": "2", "RELAY_CIRCUIT_COOLDOWN_S": "30"}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Relay, Relay]:
    redis.Redis(db=15).flushdb()
    tmp = tmp_path_factory.mktemp("scale-out")
    # The second start on the same database runs the migrations again and must not bootstrap a second time.
    with postgres_database() as url, run_relay(url, tmp, env=ENV) as a, run_relay(url, tmp, env=ENV) as b:
        assert a.url != b.url
        yield a, b


def _post(relay: Relay, key: str, model: str, **body) -> httpx.Response:
    """One chat completion on a new connection."""
    return httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "messages": HI, **body})


def _alternate(relays: tuple[Relay, Relay], keys: list[str], model: str, n: int, workers: int = 1,
               **body) -> list[tuple[int, httpx.Response]]:
    """The load generator: request i goes to process i % 2 (with key i % len(keys)); with `workers` > 1 that
    many at once. Returns (process index, answer) in request order."""
    def one(i: int) -> tuple[int, httpx.Response]:
        return i % 2, _post(relays[i % 2], keys[i % len(keys)], model, **body)

    if workers == 1:
        return [one(i) for i in range(n)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def _knows(relay: Relay, key: str, model: str) -> int:
    """GET /v1/models/{model}: authenticates the key against this process's catalog without touching rate
    limits, quotas or any upstream. 200 once the process has both the key and a channel for the model."""
    return httpx.get(f"{relay.url}/v1/models/{model}", headers={"Authorization": f"Bearer {key}"},
                     timeout=10).status_code


def _until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls `check` every 20 ms; returns the seconds it took to hold."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


def _synced(pair: tuple[Relay, Relay], key: str, model: str) -> None:
    for relay in pair:
        _until(lambda r=relay: _knows(r, key, model) == 200, EDIT_BOUND_S, f"{relay.url} knows the key and model")


def _model(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _error(response: httpx.Response) -> dict:
    return response.json()["error"]


def _circuits(relay: Relay) -> dict[str, float]:
    text = httpx.get(relay.url + "/metrics", timeout=10).text
    return {s.labels["channel"]: s.value for family in text_string_to_metric_families(text)
            if family.name == "relay_channel_circuit_open" for s in family.samples}


def test_second_process_joins_without_a_second_bootstrap(pair):
    a, b = pair
    defaults = [t for t in a.ok("GET", "/admin/tenants") if t["name"] == "default"]
    assert len(defaults) == 1, defaults
    assert len(b.ok("GET", f"/admin/keys?tenant_id={defaults[0]['id']}")) == 1
    printed = [re.findall(r"sk-[A-Za-z0-9_-]{43}", r.log_path.read_text()) for r in pair]
    assert len(printed[0]) == 1 and printed[1] == [], printed  # only the first start made (and showed) a key
    for relay in pair:
        ready = httpx.get(relay.url + "/health/ready", timeout=10).json()
        assert ready["checks"]["redis"] == "ok" and ready["checks"]["migrations"] == "ok", ready


def test_rate_limit_holds_across_both_processes(pair, upstream):
    a, b = pair
    model = _model("rl")
    add_fake_channel(a, upstream[1], model, [model])
    key = a.new_key(rpm=RPM)
    _synced(pair, key["key"], model)
    start = time.monotonic()
    answers = _alternate(pair, [key["key"]], model, 2 * RPM)
    elapsed = time.monotonic() - start
    assert elapsed < 60 / RPM, f"the load took {elapsed:.1f} s: the bucket refilled meanwhile, retry on a calmer host"
    # Exactly the burst passes, whichever process takes each request: 3 admitted by each, then both refuse.
    assert [r.status_code for _, r in answers] == [200] * RPM + [429] * RPM, [r.text for _, r in answers]
    refused = [(i, r) for i, r in answers if r.status_code == 429]
    assert {i for i, _ in refused} == {0, 1}
    for _, r in refused:
        assert _error(r)["code"] == "rate_limit_exceeded" and _error(r)["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 60 / RPM, r.headers["retry-after"]


def test_tenant_rate_limit_under_concurrent_load_on_both(pair, upstream):
    """The tenant's bucket is one Lua script in Redis: 4x its burst, 8 at a time over two keys and two
    processes, still admits exactly the burst."""
    a, b = pair
    model = _model("rl-tenant")
    add_fake_channel(a, upstream[1], model, [model])
    first = a.new_key(tenant={"rpm": RPM})
    second = a.ok("POST", "/admin/keys", {"tenant_id": first["tenant_id"], "name": "second"})
    for key in (first, second):
        _synced(pair, key["key"], model)
    start = time.monotonic()
    answers = _alternate(pair, [first["key"], first["key"], second["key"], second["key"]], model, 4 * RPM,
                         workers=8)
    assert time.monotonic() - start < 60 / RPM
    statuses = [r.status_code for _, r in answers]
    assert sorted(statuses) == [200] * RPM + [429] * (3 * RPM), statuses
    assert {i for i, r in answers if r.status_code == 429} == {0, 1}


def test_quota_is_one_budget_for_both_processes(pair, upstream):
    a, b = pair
    model = _model("quota")
    add_fake_channel(a, upstream[1], model, [model])
    quota = 60  # each answer here bills 7 tokens (4 prompt + 3 completion); each request reserves a bit more
    key = a.new_key(token_quota=quota)
    _synced(pair, key["key"], model)
    # Concurrent first (holds of requests in flight on the other process must count), then one at a time.
    answers = _alternate(pair, [key["key"]], model, 6, workers=6, max_tokens=5)
    tail = []
    for i in itertools.count():
        assert i < 30, "the quota never ran out"
        tail.append((i % 2, _post(pair[i % 2], key["key"], model, max_tokens=5)))
        if [r.status_code for _, r in tail[-4:]] == [429] * 4:
            break
    answers += tail
    billed = sum(r.json()["usage"]["total_tokens"] for _, r in answers if r.status_code == 200)
    assert billed <= quota, billed  # every request named max_tokens: the reservations bound the spending
    statuses = [r.status_code for _, r in tail]
    first_refusal = statuses.index(429)
    # Once refused by one process, refused by both: nothing is admitted after the first refusal.
    assert statuses[first_refusal:] == [429] * (len(statuses) - first_refusal), statuses
    refusals = [(i, r) for i, r in tail[first_refusal:]]
    assert {i for i, _ in refusals} == {0, 1}
    lefts = set()
    for _, r in refusals:
        assert _error(r)["code"] == "insufficient_quota", r.text
        left, wanted = map(int, re.search(r"has (\d+) tokens of its quota left.*up to (\d+)", _error(r)["message"])
                           .groups())
        assert left < wanted
        lefts.add(left)
    # Both processes see the same spending: all of it, wherever it was served.
    assert lefts == {quota - billed}, (lefts, quota, billed)
    _until(lambda: a.ok("GET", f"/admin/keys/{key['id']}")["used_tokens"] == billed, 10, "usage totals written")


def test_cache_is_shared_by_both_processes(pair, upstream, calls):
    a, b = pair
    model = _model("cache")
    add_fake_channel(a, upstream[1], model, [model, "cache-slow"], model_mapping={"cache-slow": "slow-400"})
    key = a.new_key()
    _synced(pair, key["key"], model)
    _synced(pair, key["key"], "cache-slow")
    question = [{"role": "user", "content": f"what is {uuid.uuid4().hex}?"}]

    def ask(relay: Relay, m: str = model, msgs: list = question) -> httpx.Response:
        return httpx.post(relay.url + "/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {key['key']}"},
                          json={"model": m, "messages": msgs, "temperature": 0})

    first, second, third = ask(a), ask(b), ask(a)
    assert [r.status_code for r in (first, second, third)] == [200] * 3
    assert [r.headers["x-relay-cache"] for r in (first, second, third)] == ["miss", "hit", "hit"]
    assert second.json()["choices"] == first.json()["choices"]
    assert [c["body"]["model"] for c in calls] == [model]  # B answered from what A stored
    # Identical concurrent misses on both processes: one upstream call (the single-flight lock is in Redis).
    calls.clear()
    other = [{"role": "user", "content": f"and {uuid.uuid4().hex}?"}]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: ask(pair[i % 2], "cache-slow", other), range(6)))
    assert [r.status_code for r in answers] == [200] * 6
    assert sorted(r.headers["x-relay-cache"] for r in answers) == ["hit"] * 5 + ["miss"], \
        [r.headers["x-relay-cache"] for r in answers]
    assert len(calls) == 1, calls


def test_circuit_opened_on_one_process_is_open_on_the_other(pair, upstream, calls):
    a, b = pair
    model = _model("circuit")
    failing = f"fail-500-{uuid.uuid4().hex[:6]}"  # the fake upstream answers 500 for it
    flaky, ok = f"flaky-{model}", f"ok-{model}"
    add_fake_channel(a, upstream[1], flaky, [model], priority=10, model_mapping={model: failing})
    add_fake_channel(a, upstream[1], ok, [model], priority=0)
    key = a.new_key()
    _synced(pair, key["key"], model)
    assert _circuits(b).get(flaky) == 0 and _circuits(b).get(ok) == 0

    def failed() -> int:
        return sum(c["body"]["model"] == failing for c in calls)

    for _ in range(2):  # RELAY_CIRCUIT_FAILURES=2 consecutive failures, all seen by A
        response = _post(a, key["key"], model)
        assert response.status_code == 200 and response.headers["x-relay-channel"] == ok
    assert failed() == 2
    # B never saw the channel fail, yet skips it from its very first request.
    for _ in range(6):
        response = _post(b, key["key"], model)
        assert response.status_code == 200 and response.headers["x-relay-channel"] == ok
    assert failed() == 2, "B still sent requests to the channel A found failing"
    # /metrics reads shared state at most once a second (relay.health.PROBE_EVERY_S)
    _until(lambda: _circuits(b)[flaky] == 1, 2.5, "B's /metrics shows the circuit open")
    assert _circuits(b)[ok] == 0
    _until(lambda: _circuits(a)[flaky] == 1, 2.5, "A's /metrics shows the circuit open")


def test_admin_edit_through_one_process_is_obeyed_by_the_other(pair, upstream):
    a, b = pair
    model = _model("edit")
    first = add_fake_channel(a, upstream[1], f"first-{model}", [model], priority=10)
    add_fake_channel(a, upstream[1], f"second-{model}", [model], priority=0)
    key = a.new_key()
    created = _until(lambda: _knows(b, key["key"], model) == 200, EDIT_BOUND_S, "B knows the new key")
    assert _post(b, key["key"], model).headers["x-relay-channel"] == f"first-{model}"

    # Disable a channel through A: B stops routing to it.
    a.ok("PATCH", f"/admin/channels/{first['id']}", {"status": "disabled"})
    disabled = _until(lambda: _post(b, key["key"], model).headers["x-relay-channel"] == f"second-{model}",
                      EDIT_BOUND_S, "B routes around the disabled channel")

    # Revoke the key through A: B refuses it.
    a.ok("DELETE", f"/admin/keys/{key['id']}")
    assert _knows(a, key["key"], model) == 401  # the process that made the edit: at once
    revoked = _until(lambda: _knows(b, key["key"], model) == 401, EDIT_BOUND_S, "B refuses the revoked key")
    refused = _post(b, key["key"], model)
    assert refused.status_code == 401 and "revoked" in _error(refused)["message"]
    print(f"\nB obeyed A's edits after: key created {created:.3f} s, channel disabled {disabled:.3f} s, "
          f"key revoked {revoked:.3f} s")


def test_edit_without_a_nudge_is_polled_by_both(pair, upstream):
    """`policy-relay key revoke` edits the database only (no Redis nudge): both processes see the config version
    move at their next poll."""
    a, b = pair
    model = _model("poll")
    add_fake_channel(a, upstream[1], model, [model])
    key = a.new_key()
    _synced(pair, key["key"], model)
    env = {**os.environ, "RELAY_DATABASE_URL": a.database_url, "RELAY_SECRET_KEY": SECRET_KEY,
           "RELAY_REDIS_URL": "none"}
    result = subprocess.run([sys.executable, "-m", "admin.cli", "key", "revoke", str(key["id"])], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # The revocation was committed before the command exited: from here both must refuse within the bound.
    took = _until(lambda: all(_knows(r, key["key"], model) == 401 for r in pair), EDIT_BOUND_S,
                  "both processes poll the edit")
    print(f"\nboth processes polled the CLI's edit within {took:.3f} s")
