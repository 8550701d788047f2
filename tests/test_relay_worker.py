"""What real clients send, through the relay to the local worker (a `local` channel to a tiny-Qwen2 worker on
127.0.0.1), with the official openai SDK: structured outputs, tools, prompt scoring, token-id prompts, the
worker's own 4xx errors, and the policies' greedy rule."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from backends.loading import load
from backends.server import create_worker_app
from tests.conftest import run_relay
from tests.fake_upstream import ServerThread
from tests.test_worker_outputs import PERSON, WEATHER

MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def lm():
    return load(MODEL)


@pytest.fixture(scope="module")
def relay(lm, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("relay-worker")
    with ServerThread(create_worker_app(lm)) as worker, run_relay(f"sqlite:///{tmp / 'rw.db'}", tmp) as relay:
        relay.ok("POST", "/admin/channels", {"name": "local", "type": "local", "base_url": worker.url,
                                             "models": [MODEL]})
        relay.ok("POST", "/admin/policies", {"model_pattern": MODEL, "preset": "qwen2.5"})  # has a JSON retry
        yield relay


@pytest.fixture
def client(relay):
    return relay.client(relay.new_key()["key"], timeout=120)


def test_structured_outputs_through_the_relay_need_no_retry(client):
    for seed in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "a person"}], seed=seed, max_tokens=48,
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
        jsonschema.validate(json.loads(raw.parse().choices[0].message.content), PERSON)
        assert "x-relay-json-attempts" not in raw.headers  # the channel decodes under the grammar: no retry
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "json"}], response_format={"type": "json_object"},
        max_tokens=40, stream=True) if c.choices)
    assert isinstance(json.loads(streamed), dict)


def test_tool_calls_through_the_relay(client):
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                            tools=WEATHER, tool_choice="required", max_tokens=60)
    call = answer.choices[0].message.tool_calls[0]
    assert answer.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER[0]["function"]["parameters"])
    deltas = [d for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Paris?"}], tools=WEATHER, tool_choice="required",
        max_tokens=60, stream=True) if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)),
                        WEATHER[0]["function"]["parameters"])


def test_scoring_and_token_id_prompts_through_the_relay(client, lm):
    scored = client.completions.create(model=MODEL, prompt="The sea is blue", echo=True, logprobs=1, max_tokens=0)
    assert scored.choices[0].text == "The sea is blue" and scored.choices[0].logprobs.token_logprobs[0] is None
    assert scored.usage.completion_tokens == 0
    ids = lm.tokenizer.encode("one two three")
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert single.usage.prompt_tokens == len(ids) and single.usage.completion_tokens == 3
    batched = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=2, temperature=0)
    assert [c.index for c in batched.choices] == [0, 1] and batched.usage.prompt_tokens == len(ids) + 2


def test_the_workers_4xx_reaches_the_client_as_it_said_it(relay):
    key = relay.new_key()["key"]
    answer = httpx.post(relay.url + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                        json={"model": MODEL, "prompt": "x", "max_tokens": 5, "guided_regex": "(unclosed"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "guided_regex" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("The constraint cannot be compiled") and "{'" not in error["message"]


def test_greedy_requests_get_no_penalty_defaults(relay, client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=2)
    assert "penalty" not in raw.headers["x-relay-rewrites"]
    sampled = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "frequency_penalty:unset->0.4" in sampled.headers["x-relay-rewrites"]
    explained = relay.ok("POST", "/admin/policies/explain", {
        "request": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}})
    notes = {n["param"]: n for n in explained["notes"]}
    assert notes["frequency_penalty"]["applied"] is False and "argmax" in notes["frequency_penalty"]["why"]
    assert "frequency_penalty" not in explained["request"]
