"""What a client sees when the upstream fails: transient trouble is a 5xx (ONE API retries elsewhere),
client errors stay 4xx, and no message carries the words that make ONE API disable this relay."""

from __future__ import annotations

import uuid

import httpx
import pytest

from channels.base import ONE_API_DISABLE_WORDS
from tests.conftest import add_fake_channel


def _failing_model(relay, upstream, status: int) -> str:
    """A fresh channel whose upstream answers `status` (a 401 auto-disables its channel, so one each)."""
    model = f"m{status}-{uuid.uuid4().hex[:8]}"
    add_fake_channel(relay, upstream[1], f"failing-{model}", [model], model_mapping={model: f"fail-{status}"})
    return model


@pytest.mark.parametrize(("upstream_status", "client_status"), [
    (400, 400), (401, 502), (404, 502), (429, 429), (500, 502), (503, 502)])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_status_mapping(relay, upstream, upstream_status, client_status, stream):
    key = relay.new_key()["key"]
    model = _failing_model(relay, upstream, upstream_status)
    response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                          json={"model": model, "stream": stream,
                                "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == client_status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    text = response.text.lower()
    assert not any(word in text for word in ONE_API_DISABLE_WORDS), text


def test_provider_words_never_reach_the_client(relay, upstream):
    add_fake_channel(relay, upstream[1], f"credit-{relay.url.rsplit(':', 1)[1]}", ["broke"],
                     model_mapping={"broke": "fail-400-credit"})
    key = relay.new_key()["key"]
    for stream in (False, True):
        body = {"model": "broke", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
        response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, json=body,
                              headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 400
        assert not any(word in response.text.lower() for word in ONE_API_DISABLE_WORDS), response.text


def test_body_litellm_cannot_translate_is_400_not_retried(relay, upstream, calls):
    """A channel through litellm (a provider it translates for) refuses what it cannot translate before sending
    anything; an OpenAI-compatible channel sends the body as it is, for the upstream to judge."""
    model = f"lt-{uuid.uuid4().hex[:8]}"
    relay.ok("POST", "/admin/channels", {"name": model, "type": "litellm", "models": [model],
                                         "base_url": upstream[1] + "/v1", "api_key": "upstream-secret",
                                         "options": {"model": "openai/lt-upstream"}})
    key = relay.new_key()["key"]
    odd = [{"role": "user", "content": [{"foo": 1}]}]
    response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                          json={"model": model, "messages": odd})
    assert response.status_code == 400, response.text
    assert calls == []
    direct = httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                        json={"model": "gpt-x", "messages": odd})
    assert direct.status_code == 200 and calls[-1]["body"]["messages"] == odd


def test_client_fields_cannot_steer_litellm(relay, upstream, calls):
    """Unknown fields never reach the upstream unless the channel lets them through, and even then only as
    data in the upstream body: none is taken as a litellm argument (api_base, headers, mock_response...)."""
    key = relay.new_key()["key"]
    hostile = {"api_base": "http://127.0.0.1:1", "mock_response": "pwned", "headers": {"X-A": "1"}}
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}], **hostile}
    response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                          json=body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello from up-x"
    assert not set(hostile) & set(calls[-1]["body"])  # dropped by default, and said so
    dropped = {part.split(":", 1)[0] for part in response.headers["x-relay-rewrites"].split(";")}
    assert set(hostile) <= dropped
    model = f"open-{relay.url.rsplit(':', 1)[1]}"
    add_fake_channel(relay, upstream[1], model, [model], passthrough=["*"])
    response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                          json={**body, "model": model})
    assert response.json()["choices"][0]["message"]["content"] == f"Hello from {model}"
    assert calls[-1]["body"]["mock_response"] == "pwned"  # forwarded as plain data


def test_unreachable_upstream_is_502(relay):
    from tests.net import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    add_fake_channel(relay, dead, f"dead-{relay.url.rsplit(':', 1)[1]}", ["dead-model"], timeout_s=5)
    key = relay.new_key()["key"]
    response = httpx.post(relay.url + "/v1/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "dead-model", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502 and response.json()["error"]["code"] == "connect_error"
