"""OpenAI's Responses API (/v1/responses) through the real relay with the official openai SDK: text and item
inputs, instructions, typed stream events, function tools and JSON-schema text formats answered by the local
worker, the policies and cache as for chat, stateless refusals, and OpenAI's 404 for unknown URLs."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import redis

from backends.loading import load
from backends.server import create_worker_app
from tests.conftest import add_fake_channel, run_relay
from tests.fake_upstream import ServerThread
from tests.test_worker_outputs import PERSON, WEATHER

REDIS_DB_URL = "redis://127.0.0.1:6379/13"
TOOL = {"type": "function", "name": "get_weather", "description": "Weather for a city",
        "parameters": WEATHER[0]["function"]["parameters"], "strict": True}


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    redis.Redis.from_url(REDIS_DB_URL).flushdb()
    tmp = tmp_path_factory.mktemp("responses")
    with ServerThread(create_worker_app(load("tiny-qwen2"))) as worker, \
            run_relay(f"sqlite:///{tmp / 'responses.db'}", tmp, env={"RELAY_REDIS_URL": REDIS_DB_URL}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["qwen-chat"])
        relay.ok("POST", "/admin/channels", {"name": "local", "type": "local", "base_url": worker.url,
                                             "models": ["tiny-qwen2"]})
        relay.ok("POST", "/admin/policies", {"model_pattern": "qwen-chat", "preset": "qwen1.5"})
        yield relay


def test_text_input_with_instructions(relay, calls):
    key = relay.new_key()
    client = relay.client(key["key"])
    raw = client.responses.with_raw_response.create(model="qwen-chat", instructions="Answer briefly.",
                                                    input="What is a relay?", temperature=0.2, max_output_tokens=32)
    response = raw.parse()
    assert response.output_text == "Hello from qwen-chat" and response.status == "completed"
    assert response.id.startswith("resp_") and response.model == "qwen-chat"
    assert response.usage.output_tokens == 3 and response.usage.input_tokens > 0
    assert raw.headers["x-relay-rewrites"] == "temperature:0.2->0.5" and raw.headers["x-relay-policy"] != "none"
    sent = calls[-1]["body"]
    assert sent["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert sent["max_tokens"] == 32 and sent["temperature"] == 0.5
    assert relay.logs(key["tenant_id"])[0]["endpoint"] == "responses"


def test_item_input_with_a_prior_tool_call(relay, calls):
    client = relay.client(relay.new_key()["key"])
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": json.dumps({"city": "Paris", "days": 1})},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]
    response = client.responses.create(model="qwen-chat", input=items, tools=[TOOL])
    assert response.output_text == "Hello from qwen-chat"
    roles = [m["role"] for m in calls[-1]["body"]["messages"]]
    assert roles == ["user", "assistant", "tool"] and calls[-1]["body"]["messages"][2]["tool_call_id"] == "call_1"


def test_stream_has_typed_numbered_events(relay):
    client = relay.client(relay.new_key()["key"])
    with client.responses.stream(model="qwen-chat", input="stream please") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert "response.output_text.delta" in types and "response.output_text.done" in types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "Hello from qwen-chat" and final.usage.output_tokens == 3
    raw = httpx.post(relay.url + "/v1/responses", headers={"Authorization": f"Bearer {relay.new_key()['key']}"},
                     json={"model": "qwen-chat", "input": "raw", "stream": True}, timeout=30)
    blocks = [b.split("\n") for b in raw.text.strip().split("\n\n")]
    named = [(b[0].removeprefix("event: "), json.loads(b[1].removeprefix("data: "))["type"]) for b in blocks]
    assert named and all(event == kind and kind.startswith("response.") for event, kind in named), named


def test_function_tools_and_json_schema_formats_from_the_worker(relay):
    client = relay.client(relay.new_key()["key"], timeout=120)
    called = client.responses.create(model="tiny-qwen2", input="Weather in Paris for 2 days?", tools=[TOOL],
                                     tool_choice="required", max_output_tokens=60)
    call = next(item for item in called.output if item.type == "function_call")
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    formatted = client.responses.create(model="tiny-qwen2", input="a person", max_output_tokens=48, text={
        "format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(formatted.output_text), PERSON)
    with client.responses.stream(model="tiny-qwen2", input="Weather?", tools=[TOOL], tool_choice="required",
                                 max_output_tokens=60) as stream:
        types = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in types
    streamed = next(item for item in final.output if item.type == "function_call")
    jsonschema.validate(json.loads(streamed.arguments), TOOL["parameters"])


def test_greedy_responses_are_cached(relay, calls):
    client = relay.client(relay.new_key()["key"])
    first = client.responses.with_raw_response.create(model="qwen-chat", input="cache me", temperature=0)
    second = client.responses.with_raw_response.create(model="qwen-chat", input="cache me", temperature=0)
    assert (first.headers["x-relay-cache"], second.headers["x-relay-cache"]) == ("miss", "hit")
    assert second.parse().output_text == first.parse().output_text
    assert second.parse().id != first.parse().id


def test_stateless_refusals_and_errors(relay, calls):
    key = relay.new_key(models=["qwen-chat"])
    client = relay.client(key["key"])
    with pytest.raises(openai.BadRequestError) as stateful:
        client.responses.create(model="qwen-chat", input="go on", previous_response_id="resp_123")
    assert stateful.value.body["param"] == "previous_response_id" and "input" in stateful.value.body["message"]
    for body, param in (({"input": ""}, "input"), ({"input": "x", "temperature": 3}, "temperature"),
                        ({"input": "x", "background": True}, "background"), ({}, "input"),
                        ({"input": "x", "conversation": "conv_1"}, "conversation"),
                        ({"input": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
                        ({"input": "x", "seed": "abc"}, "seed"), ({"input": "x", "stop": ["a"] * 10}, "stop"),
                        ({"input": [{"type": "function_call_output"}]}, "input")):
        answer = httpx.post(relay.url + "/v1/responses", headers={"Authorization": f"Bearer {key['key']}"},
                            json={"model": "qwen-chat", **body}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (body, answer.text)
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model="tiny-qwen2", input="not for this key")
    assert not calls
    unknown = httpx.post(relay.url + "/v1/nothing-here", headers={"Authorization": f"Bearer {key['key']}"}, json={})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {"message": "Invalid URL (POST /v1/nothing-here)",
                                       "type": "invalid_request_error", "param": None, "code": None}
    assert httpx.get(relay.url + "/v1/models", headers={"Authorization": f"Bearer {key['key']}"}).status_code == 200
