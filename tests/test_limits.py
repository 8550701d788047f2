"""Requests and tokens per minute, per key and per tenant, enforced through Redis across two gateway
processes: driven at twice the limit, the accepted rate stays close to the configured one."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from tests.conftest import add_fake_channel, postgres_database, run_relay

REDIS_URL = "redis://127.0.0.1:6379/8"


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    redis.Redis.from_url(REDIS_URL).flushdb()
    tmp = tmp_path_factory.mktemp("limits")
    with postgres_database() as url, run_relay(url, tmp, "--workers", "2",
                                               env={"RELAY_REDIS_URL": REDIS_URL}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["limited-model"])
        time.sleep(1.5)  # both processes have the channel
        yield relay


def _drive(relay, key: str | list[str], per_second: float, seconds: float) -> list[httpx.Response]:
    """Requests paced at a fixed rate, each on a new connection (so both processes take some); with several
    keys, they take turns. `_drive.elapsed` is how long it really took (slow answers stretch it)."""
    keys = [key] if isinstance(key, str) else key
    answers, start = [], time.monotonic()
    for i in range(int(per_second * seconds)):
        delay = start + i / per_second - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        answers.append(httpx.post(relay.url + "/v1/chat/completions", timeout=30,
                                  headers={"Authorization": f"Bearer {keys[i % len(keys)]}"},
                                  json={"model": "limited-model", "messages": [{"role": "user", "content": "hi"}]}))
    _drive.elapsed = time.monotonic() - start
    return answers


def test_requests_per_minute_per_key(relay):
    key = relay.new_key(rpm=240)  # 4 per second, burst of 1 s worth = 4
    time.sleep(1.5)
    answers = _drive(relay, key["key"], per_second=8, seconds=8)
    accepted = sum(a.status_code == 200 for a in answers)
    expected = 4 * _drive.elapsed + 4  # the configured rate over the time the 2x load really took, plus the burst
    assert abs(accepted - expected) <= 0.1 * expected, accepted
    refused = [a for a in answers if a.status_code == 429]
    assert refused and all(int(a.headers["retry-after"]) >= 1 for a in refused)
    error = refused[0].json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "240 requests per minute" in error["message"]


def test_requests_per_minute_per_tenant_spans_keys(relay):
    first = relay.new_key(tenant={"rpm": 240})  # 4 per second for the tenant, whichever key asks
    second = relay.ok("POST", "/admin/keys", {"tenant_id": first["tenant_id"], "name": "second"})
    time.sleep(1.5)
    answers = _drive(relay, [first["key"], second["key"]], per_second=8, seconds=6)  # each key at the limit
    accepted = sum(r.status_code == 200 for r in answers)
    expected = 4 * _drive.elapsed + 4  # not every request: the two keys share the tenant's bucket
    assert abs(accepted - expected) <= 0.15 * expected, accepted


def test_tokens_per_minute(relay):
    key = relay.new_key(tpm=600)  # 10 tokens per second; each answer here costs 7 tokens
    time.sleep(1.5)
    answers = _drive(relay, key["key"], per_second=3, seconds=10)  # 21 tokens per second offered
    tokens = sum(a.json()["usage"]["total_tokens"] for a in answers if a.status_code == 200)
    expected = 10 * _drive.elapsed
    assert expected * 0.8 <= tokens <= expected * 1.2 + 10, tokens  # 10 tokens/s (+ one answer of overdraft)
    assert any(a.status_code == 429 for a in answers)


def test_limits_are_editable_without_restart(relay):
    key = relay.new_key(rpm=60)
    time.sleep(1.5)
    assert [a.status_code for a in _drive(relay, key["key"], 10, 0.5)].count(429) >= 3
    relay.ok("PATCH", f"/admin/keys/{key['id']}", {"rpm": None})
    time.sleep(1.5)
    assert all(a.status_code == 200 for a in _drive(relay, key["key"], 10, 0.5))
