"""Anthropic's Messages API (/v1/messages) through the real relay with Anthropic's own SDK: Claude Code-style
requests against Qwen channels get the model's policy, the cache, failover, quotas and the log as chat does;
streams carry Anthropic's events; tools reach the local worker; errors are Anthropic's shape."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest
import redis

from backends.loading import load
from backends.server import create_worker_app
from tests.conftest import add_fake_channel, postgres_database, run_relay
from tests.fake_upstream import ServerThread
from tests.net import free_port
from tests.test_worker_outputs import WEATHER

REDIS_DB_URL = "redis://127.0.0.1:6379/12"
ASK = [{"role": "user", "content": "Explain this repository."}]
GREEDY = {"temperature": 0}
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": WEATHER[0]["function"]["parameters"]}]


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    redis.Redis.from_url(REDIS_DB_URL).flushdb()
    tmp = tmp_path_factory.mktemp("messages")
    with postgres_database() as url, ServerThread(create_worker_app(load("tiny-qwen2"))) as worker, \
            run_relay(url, tmp, env={"RELAY_REDIS_URL": REDIS_DB_URL}) as relay:
        add_fake_channel(relay, f"http://127.0.0.1:{free_port()}", "dead", ["qwen-chat"], priority=10, timeout_s=3)
        add_fake_channel(relay, upstream[1], "fake", ["qwen-chat", "qwen-broken"],
                         model_mapping={"qwen-broken": "broken-tool-call"})
        relay.ok("POST", "/admin/channels", {"name": "local", "type": "local", "base_url": worker.url,
                                             "models": ["tiny-qwen2"]})
        relay.ok("POST", "/admin/policies", {"model_pattern": "qwen-chat", "preset": "qwen1.5"})
        yield relay


def _client(relay, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=relay.url, max_retries=0, timeout=120)  # sends x-api-key


def test_claude_code_style_request_gets_the_qwen_policy(relay, calls):
    key = relay.new_key()
    raw = _client(relay, key["key"]).messages.with_raw_response.create(
        model="qwen-chat", max_tokens=64, system=[{"type": "text", "text": "You are a coding agent."}],
        messages=ASK, stop_sequences=["END"], extra_body={"temperature": 0.2})  # this SDK has no sampling arguments
    message = raw.parse()
    assert message.content[0].text == "Hello from qwen-chat" and message.stop_reason == "end_turn"
    assert message.role == "assistant" and message.model == "qwen-chat" and message.id.startswith("msg_")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 3
    assert raw.headers["x-relay-rewrites"] == "temperature:0.2->0.5"  # the floor of Qwen1.5's crash
    assert raw.headers["x-relay-channel"] == "fake"  # the dead channel failed over
    sent = calls[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "You are a coding agent."}]}
    assert sent["stop"] == ["END"] and sent["max_tokens"] == 64 and sent["temperature"] == 0.5
    rows = relay.logs(key["tenant_id"])
    assert rows[0]["endpoint"] == "messages" and rows[0]["completion_tokens"] == 3


def test_stream_carries_anthropic_events_and_usage(relay):
    client = _client(relay, relay.new_key()["key"])
    with client.messages.stream(model="qwen-chat", max_tokens=64, messages=ASK) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "content_block_start" in types and "content_block_delta" in types and "message_delta" in types
    assert final.content[0].text == "Hello from qwen-chat" and final.usage.output_tokens == 3


def test_greedy_requests_are_cached_and_quota_refusals_are_anthropic_429s(relay, calls):
    key = relay.new_key(tenant={"token_quota": 40})
    client = _client(relay, key["key"])
    first = client.messages.with_raw_response.create(model="qwen-chat", max_tokens=8, messages=ASK, extra_body=GREEDY)
    second = client.messages.with_raw_response.create(model="qwen-chat", max_tokens=8, messages=ASK, extra_body=GREEDY)
    assert "top_k:unset->1" in first.headers["x-relay-rewrites"]  # greedy the way Qwen1.5 takes it
    assert (first.headers["x-relay-cache"], second.headers["x-relay-cache"]) == ("miss", "hit")
    assert second.parse().content[0].text == first.parse().content[0].text
    with pytest.raises(anthropic.RateLimitError) as refused:
        for _ in range(10):
            client.messages.create(model="qwen-chat", max_tokens=8, messages=ASK, extra_body={"temperature": 0.7})
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "rate_limit_error"


def test_tools_reach_the_worker_and_come_back_as_tool_use(relay):
    client = _client(relay, relay.new_key()["key"])
    ask = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    message = client.messages.create(model="tiny-qwen2", max_tokens=60, messages=ask, tools=TOOLS,
                                     tool_choice={"type": "any"})
    use = next(block for block in message.content if block.type == "tool_use")
    assert message.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, TOOLS[0]["input_schema"])
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}
    follow_up = ask + [{"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
                       {"role": "user", "content": [result]}]
    assert client.messages.create(model="tiny-qwen2", max_tokens=4, messages=follow_up).stop_reason in (
        "end_turn", "max_tokens")
    with client.messages.stream(model="tiny-qwen2", max_tokens=60, messages=ask, tools=TOOLS,
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "input_json_delta" in deltas and final.stop_reason == "tool_use"
    jsonschema.validate(next(b for b in final.content if b.type == "tool_use").input, TOOLS[0]["input_schema"])


def test_errors_are_anthropic_shaped(relay, calls):
    key = relay.new_key(models=["qwen-chat"])
    client = _client(relay, key["key"])
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="qwen-chat", max_tokens=0, messages=ASK)
    assert bad.value.body["error"]["type"] == "invalid_request_error" and "max_tokens" in bad.value.body["error"][
        "message"]
    with pytest.raises(anthropic.AuthenticationError) as unauthorised:
        _client(relay, "sk-wrong").messages.create(model="qwen-chat", max_tokens=8, messages=ASK)
    assert unauthorised.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
        client.messages.create(model="tiny-qwen2", max_tokens=8, messages=ASK)
    assert forbidden.value.body["error"]["type"] == "permission_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        _client(relay, relay.new_key()["key"]).messages.create(model="no-such-model", max_tokens=8, messages=ASK)
    assert missing.value.body["error"]["type"] == "not_found_error"
    headers = {"Authorization": f"Bearer {key['key']}", "anthropic-version": "2023-06-01"}
    no_max = httpx.post(relay.url + "/v1/messages", headers=headers, json={"model": "qwen-chat", "messages": ASK})
    assert no_max.status_code == 400 and "max_tokens" in no_max.json()["error"]["message"]
    for broken in ({"role": "system", "content": "x"}, {"role": "user", "content": [{"type": "image"}]}):
        answer = httpx.post(relay.url + "/v1/messages", headers=headers,
                            json={"model": "qwen-chat", "max_tokens": 8, "messages": [broken]}, timeout=30)
        assert answer.status_code == 400 and answer.json()["type"] == "error", answer.text
    bearer = httpx.post(relay.url + "/v1/messages", headers=headers, timeout=30,
                        json={"model": "qwen-chat", "max_tokens": 8, "messages": ASK})
    assert bearer.status_code == 200 and bearer.json()["content"][0]["type"] == "text"


def test_an_answer_anthropic_cannot_express_is_a_502_logged_as_one(relay, calls):
    key = relay.new_key()
    for _ in range(2):  # greedy, so cacheable: a refused answer must not be kept and replayed
        with pytest.raises(anthropic.APIStatusError) as failed:
            _client(relay, key["key"]).messages.create(model="qwen-broken", max_tokens=8, messages=ASK, tools=TOOLS,
                                                       extra_body=GREEDY)
        assert failed.value.status_code == 502 and failed.value.body["error"]["type"] == "api_error"
    assert len(calls) == 2
    rows = relay.logs(key["tenant_id"], want=2)
    assert {(r["status_code"], r["error_type"], r["cache"]) for r in rows} == {(502, "untranslatable_answer", "miss")}
    assert all(r["completion_tokens"] > 0 for r in rows)  # the upstream did the work: it is billed


def test_bodies_empty_after_translation_are_400s(relay, calls):
    headers = {"x-api-key": relay.new_key()["key"]}
    for content in ("", [], [{"type": "mystery"}]):
        answer = httpx.post(relay.url + "/v1/messages", headers=headers, timeout=30, json={
            "model": "qwen-chat", "max_tokens": 8, "messages": [{"role": "user", "content": content}]})
        assert answer.status_code == 400 and answer.json()["type"] == "error", (content, answer.text)
    assert not calls


def test_count_tokens(relay, calls):
    key = relay.new_key(models=["qwen-chat"])
    client = _client(relay, key["key"])
    short = client.messages.count_tokens(model="qwen-chat", messages=ASK)
    longer = client.messages.count_tokens(model="qwen-chat", messages=ASK, system="You are a careful agent. " * 20)
    assert 0 < short.input_tokens < longer.input_tokens
    with pytest.raises(anthropic.PermissionDeniedError):
        client.messages.count_tokens(model="tiny-qwen2", messages=ASK)
    missing = httpx.post(relay.url + "/v1/messages/count_tokens", json={"model": "qwen-chat", "messages": ASK})
    assert missing.status_code == 401 and "x-api-key" in missing.json()["error"]["message"]
    assert not calls and not relay.logs(key["tenant_id"], want=1, timeout=0.5)  # free: nothing sent or logged


def test_explain_reads_anthropic_and_responses_bodies(relay):
    body = {"model": "qwen-chat", "max_tokens": 100, "system": "be brief", "messages": ASK, "temperature": 0.2,
            "top_k": 50, "stop_sequences": ["END"]}
    explained = relay.ok("POST", "/admin/policies/explain", {"request": body})
    assert explained["endpoint"] == "messages" and explained["request"]["stop"] == ["END"]
    assert explained["rewrites"] == [{"param": "temperature", "from": 0.2, "to": 0.5, "rule": "temperature.min"}]
    responses = relay.ok("POST", "/admin/policies/explain", {"request": {
        "model": "qwen-chat", "input": "hi", "max_output_tokens": 9, "temperature": 0.1}})
    assert responses["endpoint"] == "responses" and responses["request"]["max_tokens"] == 9
    assert responses["request"]["temperature"] == 0.5
    embedding = relay.ok("POST", "/admin/policies/explain", {"endpoint": "embeddings", "request": {
        "model": "qwen-chat", "input": "hi"}})
    assert embedding["rewrites"] == [] and embedding["request"] == {"model": "qwen-chat", "input": "hi"}
    bad = relay.admin("POST", "/admin/policies/explain", {"endpoint": "messages", "request": {"model": "qwen-chat"}})
    assert bad.status_code == 400 and json.loads(bad.text)["error"]["param"] == "request.max_tokens"
