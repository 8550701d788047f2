"""Routing across channels through the real relay: priority tiers with failover, never retrying a client
error, weighted split, the Redis circuit breaker, auto-disable on refused credentials, and a channel's
server killed under load without losing a request."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.conftest import ROOT, add_fake_channel, run_relay
from tests.net import free_port, wait_healthy

REDIS_URL = "redis://127.0.0.1:6379/10"


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    redis.Redis.from_url(REDIS_URL).flushdb()
    tmp = tmp_path_factory.mktemp("routing")
    env = {"RELAY_REDIS_URL": REDIS_URL, "RELAY_CIRCUIT_FAILURES": "2", "RELAY_CIRCUIT_COOLDOWN_S": "2"}
    with run_relay(f"sqlite:///{tmp / 'routing.db'}", tmp, env=env) as relay:
        yield relay


def _ask(relay, key: str, model: str, stream: bool = False) -> httpx.Response:
    return httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


def _model() -> str:
    return f"route-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("stream", [False, True])
def test_failover_to_the_next_tier(relay, upstream, calls, stream):
    model = _model()
    add_fake_channel(relay, f"http://127.0.0.1:{free_port()}", f"dead-{model}", [model], priority=10, timeout_s=3)
    add_fake_channel(relay, upstream[1], f"5xx-{model}", [model], priority=5, model_mapping={model: "fail-503"})
    add_fake_channel(relay, upstream[1], f"ok-{model}", [model], priority=0)
    response = _ask(relay, relay.new_key()["key"], model, stream)
    assert response.status_code == 200 and response.headers["x-relay-channel"] == f"ok-{model}"
    assert [c["body"]["model"] for c in calls] == ["fail-503", model]  # dead one: no call arrived at all


def test_client_errors_are_not_retried(relay, upstream, calls):
    model = _model()
    add_fake_channel(relay, upstream[1], f"400-{model}", [model], priority=10, model_mapping={model: "fail-400"})
    add_fake_channel(relay, upstream[1], f"ok-{model}", [model], priority=0)
    assert _ask(relay, relay.new_key()["key"], model).status_code == 400
    assert len(calls) == 1


def test_weighted_split_inside_a_tier(relay, upstream):
    model = _model()
    add_fake_channel(relay, upstream[1], f"heavy-{model}", [model], weight=3)
    add_fake_channel(relay, upstream[1], f"light-{model}", [model], weight=1)
    key = relay.new_key()["key"]
    with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
        split = Counter(client.post(relay.url + "/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "hi"}]}).headers["x-relay-channel"]
            for _ in range(400))
    assert 0.68 <= split[f"heavy-{model}"] / 400 <= 0.82, split  # 3:1, ±3 standard deviations


def test_circuit_breaker_cools_a_failing_channel(relay, upstream, calls):
    model = _model()
    add_fake_channel(relay, upstream[1], f"flaky-{model}", [model], priority=10, model_mapping={model: "fail-500"})
    add_fake_channel(relay, upstream[1], f"ok-{model}", [model], priority=0)
    key = relay.new_key()["key"]
    for _ in range(2):  # two consecutive failures (RELAY_CIRCUIT_FAILURES=2) open the circuit
        assert _ask(relay, key, model).status_code == 200
    assert sum(c["body"]["model"] == "fail-500" for c in calls) == 2
    for _ in range(5):
        assert _ask(relay, key, model).status_code == 200
    assert sum(c["body"]["model"] == "fail-500" for c in calls) == 2  # skipped while cooling down
    time.sleep(2.5)  # RELAY_CIRCUIT_COOLDOWN_S=2
    assert _ask(relay, key, model).status_code == 200
    assert sum(c["body"]["model"] == "fail-500" for c in calls) == 3  # tried again afterwards


@pytest.mark.parametrize("refusal", ["wrong-key", "deactivated"])
def test_refused_credentials_auto_disable_the_channel(relay, upstream, refusal):
    """401, or a 403 whose code says the key is bad, RELAY_CIRCUIT_FAILURES (2 here) times in a row."""
    model = _model()
    fields = {"api_key": "wrong"} if refusal == "wrong-key" else {"model_mapping": {model: "fail-403-deactivated"}}
    bad = add_fake_channel(relay, upstream[1], f"badkey-{model}", [model], priority=10, **fields)
    add_fake_channel(relay, upstream[1], f"ok-{model}", [model], priority=0)
    key = relay.new_key()["key"]
    response = _ask(relay, key, model)
    assert response.status_code == 200 and response.headers["x-relay-channel"] == f"ok-{model}"
    assert relay.ok("GET", f"/admin/channels/{bad['id']}")["status"] == "enabled"  # once is not yet a pattern
    assert _ask(relay, key, model).status_code == 200
    deadline = time.time() + 5  # the disable is written off the request path
    while relay.ok("GET", f"/admin/channels/{bad['id']}")["status"] != "auto_disabled":
        assert time.time() < deadline
        time.sleep(0.05)
    events = [e for e in relay.ok("GET", "/admin/audit?entity=channel")["data"]
              if e["entity_id"] == bad["id"] and e["action"] == "auto_disable"]
    assert events and events[0]["actor"] == "relay" and events[0]["after"]["status"] == "auto_disabled"


def test_a_request_refused_with_403_is_that_requests_error(relay, upstream, calls):
    """One tenant's 403 ("this key may not use that model") is its 4xx: no failover, no breaker count, and the
    channel stays enabled for everybody."""
    model = _model()
    forbidding = add_fake_channel(relay, upstream[1], f"403-{model}", [model], priority=10,
                                  model_mapping={model: "fail-403"})
    add_fake_channel(relay, upstream[1], f"ok-{model}", [model], priority=0)
    key = relay.new_key()["key"]
    for _ in range(4):  # twice RELAY_CIRCUIT_FAILURES
        response = _ask(relay, key, model)
        assert response.status_code == 403, response.text
        error = response.json()["error"]
        assert error["code"] == "upstream_forbidden" and "failing with 403" in error["message"]
    assert [c["body"]["model"] for c in calls] == ["fail-403"] * 4  # never failed over, never cooled down
    assert relay.ok("GET", f"/admin/channels/{forbidding['id']}")["status"] == "enabled"


def test_killing_a_channel_under_load_loses_no_request(relay):
    ports = [free_port(), free_port()]
    servers = [subprocess.Popen([sys.executable, "-m", "tests.fake_upstream", "--port", str(p)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for p in ports]
    try:
        for port in ports:
            wait_healthy(f"http://127.0.0.1:{port}/v1/models")
        model = _model()
        for i, port in enumerate(ports):
            add_fake_channel(relay, f"http://127.0.0.1:{port}", f"twin{i}-{model}", [model], timeout_s=5)
        key = relay.new_key()["key"]

        def one(i: int) -> int:
            if i == 60:
                servers[0].kill()
            return _ask(relay, key, model, stream=bool(i % 2)).status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(200)))
        assert statuses == [200] * 200
    finally:
        for server in servers:
            server.kill()


def test_retries_try_the_same_channel_before_failing_over(relay, upstream, calls):
    """`retries: 2` on a channel whose upstream fails: three tries there, then the next channel."""
    model = _model()
    add_fake_channel(relay, upstream[1], f"retrying-{model}", [model], priority=10, retries=2,
                     model_mapping={model: "fail-503"})
    add_fake_channel(relay, upstream[1], f"ok-{model}", [model], priority=0)
    response = _ask(relay, relay.new_key()["key"], model, stream=False)
    assert response.status_code == 200 and response.headers["x-relay-channel"] == f"ok-{model}"
    assert [c["body"]["model"] for c in calls] == ["fail-503"] * 3 + [model]
