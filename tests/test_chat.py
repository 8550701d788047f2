"""End to end: the official openai SDK → policy-relay (real process) → fake OpenAI upstream (real HTTP)."""

from __future__ import annotations

import openai
import pytest


def test_chat_non_streamed_through_mapped_channel(relay, calls):
    key = relay.new_key()
    client = relay.client(key["key"])
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-x", messages=[{"role": "user", "content": "hi there"}], max_tokens=20,
        extra_body={"top_k": 5, "repetition_penalty": 1.05})
    answer = raw.parse()
    # The fake upstream names the model it was asked for: proves the alias → upstream mapping.
    assert answer.choices[0].message.content == "Hello from up-x"
    assert answer.model == "gpt-x"  # clients see the name they asked for
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens == 5 and answer.usage.total_tokens == 8
    assert raw.headers["x-relay-channel"] == "fake"
    assert raw.headers["x-relay-cache"] == "bypass"
    assert len(calls) == 1
    sent = calls[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["authorization"] == "Bearer upstream-secret"  # the channel's key, never the tenant's
    assert sent["body"]["model"] == "up-x"
    assert sent["body"]["max_tokens"] == 20
    # Fields OpenAI does not define reach OpenAI-compatible upstreams (vLLM's top_k, ...).
    assert sent["body"]["top_k"] == 5 and sent["body"]["repetition_penalty"] == 1.05


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_streamed(relay, calls, include_usage):
    key = relay.new_key()
    client = relay.client(key["key"])
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(
        model="plain-model", messages=[{"role": "user", "content": "hi"}], stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from plain-model"
    assert all(c.object == "chat.completion.chunk" and c.model == "plain-model" for c in chunks)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        # OpenAI's shape: one final chunk with the usage and no choices.
        assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1].choices == []
        assert with_usage[0].usage.completion_tokens == 3
    else:
        assert with_usage == []
    # The relay always asks the upstream for usage, so the log and quotas are exact either way.
    assert calls[-1]["body"]["stream_options"] == {"include_usage": True}
    rows = relay.logs(key["tenant_id"])
    assert rows[0]["stream"] is True and rows[0]["completion_tokens"] == 3 and rows[0]["status_code"] == 200


def test_stream_raw_sse_format(relay):
    """The bytes on the wire: `data: {json}` events separated by blank lines, ending in [DONE]."""
    import httpx

    key = relay.new_key()
    with httpx.stream("POST", relay.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key['key']}"},
                      json={"model": "gpt-x", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_text_completions(relay, calls):
    key = relay.new_key()
    client = relay.client(key["key"])
    answer = client.completions.create(model="gpt-x", prompt="Say hello", max_tokens=8)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == "Hello from up-x"
    assert answer.usage.total_tokens == 5
    assert calls[-1]["path"] == "/v1/completions" and calls[-1]["body"]["prompt"] == "Say hello"
    chunks = list(client.completions.create(model="gpt-x", prompt="Say hello", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello from up-x"
    assert chunks[-1].usage.total_tokens == 5


def test_models_lists_only_allowed(relay):
    everything = relay.new_key()
    names = {m.id for m in relay.client(everything["key"]).models.list()}
    assert {"gpt-x", "plain-model"} <= names
    limited = relay.new_key(models=["plain-model"])
    assert [m.id for m in relay.client(limited["key"]).models.list()] == ["plain-model"]
    assert relay.client(limited["key"]).models.retrieve("plain-model").id == "plain-model"
    with pytest.raises(openai.NotFoundError):
        relay.client(limited["key"]).models.retrieve("gpt-x")


def test_every_request_is_logged_and_counted(relay):
    key = relay.new_key()
    client = relay.client(key["key"])
    for _ in range(3):
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "one two"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    rows = relay.logs(key["tenant_id"], want=4)
    assert len(rows) == 4
    ok = [r for r in rows if r["status_code"] == 200]
    assert len(ok) == 3
    assert all(r["channel_id"] is not None and r["upstream_model"] == "up-x" and r["total_tokens"] == 8
               and r["latency_ms"] > 0 and r["key_id"] == key["id"] for r in ok)
    assert [r["error_type"] for r in rows if r["status_code"] == 404] == ["model_not_found"]
    tenant = relay.ok("GET", f"/admin/tenants/{key['tenant_id']}")
    assert tenant["used_tokens"] == 24
    assert relay.ok("GET", f"/admin/keys/{key['id']}")["used_tokens"] == 24


def test_token_quota_is_enforced(relay):
    """Each request reserves its prompt + max_tokens; it is admitted only while that fits in what is left."""
    key = relay.new_key(tenant={"token_quota": 30})
    client = relay.client(key["key"])
    answered = 0
    with pytest.raises(openai.RateLimitError) as exc:
        for _ in range(10):  # 7 tokens spent per answer; each reserves ~12 (its prompt + max_tokens 4)
            client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "a"}], max_tokens=4)
            answered += 1
    assert exc.value.body["type"] == "insufficient_quota"
    assert 1 <= answered <= 4
    # Without max_tokens a request reserves the default output estimate, which does not fit.
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "a"}])
    assert "lower max_tokens" in exc.value.body["message"]
    # Raising the quota through the admin API lets the tenant back in without a restart.
    relay.ok("PATCH", f"/admin/tenants/{key['tenant_id']}", {"token_quota": 100_000})
    import time

    deadline = time.time() + 5
    while True:
        try:
            client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "a"}])
            break
        except openai.RateLimitError:
            assert time.time() < deadline
            time.sleep(0.1)
    assert relay.logs(key["tenant_id"], want=answered + 3)[0]["status_code"] == 200


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.mark.parametrize("provider", ["hosted_vllm", "openai"])
def test_tools_and_sampling_fields_reach_the_upstream(relay, upstream, calls, provider):
    """Both litellm routes of the `openai` channel type carry tools, response_format and sampling fields."""
    from tests.conftest import add_fake_channel

    model = f"tools-{provider}"
    if not any(c["name"] == model for c in relay.ok("GET", "/admin/channels")):
        add_fake_channel(relay, upstream[1], model, [model], options={"litellm_provider": provider})
    client = relay.client(relay.new_key()["key"])
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "weather in Paris?"}], tools=TOOLS, tool_choice="auto",
        temperature=0.2, top_p=0.9, seed=7, stop=["\n\n"], response_format={"type": "json_object"},
        frequency_penalty=0.4, presence_penalty=0.3, logprobs=True, top_logprobs=3)
    assert answer.choices[0].message.content == f"Hello from {model}"
    sent = calls[-1]["body"]
    assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["tool_choice"] == "auto"
    assert sent["tools"][0]["function"]["parameters"]["required"] == ["city"]
    expected = {"temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["\n\n"], "frequency_penalty": 0.4,
                "presence_penalty": 0.3, "logprobs": True, "top_logprobs": 3,
                "response_format": {"type": "json_object"}}
    assert {k: sent[k] for k in expected} == expected
