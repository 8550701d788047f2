"""Tenant keys: every way a key or a body can be wrong gets the right OpenAI-shaped 4xx."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from relay.db import normalise_url

CHAT = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}


def _post(relay, body, key: str | None, headers: dict | None = None, raw: bytes | None = None) -> httpx.Response:
    hdrs = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    if raw is not None:
        return httpx.post(relay.url + "/v1/chat/completions", content=raw, headers=hdrs, timeout=30)
    return httpx.post(relay.url + "/v1/chat/completions", json=body, headers=hdrs, timeout=30)


def _assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def test_secret_is_random_shown_once_and_stored_only_as_hash(relay):
    created = relay.new_key()
    secret = created["key"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", secret)  # 32 random bytes = 256 bits
    assert secret.startswith(created["prefix"]) and len(created["prefix"]) < len(secret) / 2
    assert relay.new_key()["key"] != secret
    listed = relay.ok("GET", f"/admin/keys?tenant_id={created['tenant_id']}")
    assert secret not in str(listed) and "key_hash" not in str(listed)
    assert secret not in str(relay.ok("GET", f"/admin/keys/{created['id']}"))
    engine = create_engine(normalise_url(relay.database_url))
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": created["id"]}).mappings().one()
    engine.dispose()
    assert secret not in str(dict(row))
    assert len(row["key_hash"]) == 64


@pytest.mark.parametrize("key", [None, "sk-not-a-real-key", ""])
def test_missing_or_unknown_key_is_401(relay, key):
    error = _assert_openai_error(_post(relay, CHAT, key), 401)
    assert error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        relay.client(key or "x").chat.completions.create(**CHAT)


def test_bad_key_beats_bad_body(relay):
    _assert_openai_error(_post(relay, None, "sk-nope", raw=b"{not json"), 401)


def test_revoked_key_is_401(relay):
    created = relay.new_key()
    relay.client(created["key"]).chat.completions.create(**CHAT)
    revoked = relay.ok("DELETE", f"/admin/keys/{created['id']}")
    assert revoked["status"] == "revoked"
    error = _assert_openai_error(_post(relay, CHAT, created["key"]), 401)
    assert "revoked" in error["message"]


def test_expired_key_is_401(relay):
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    created = relay.new_key(expires_at=past)
    assert "expired" in _assert_openai_error(_post(relay, CHAT, created["key"]), 401)["message"]
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert _post(relay, CHAT, relay.new_key(expires_at=future)["key"]).status_code == 200


def test_disabled_tenant_is_401(relay):
    created = relay.new_key()
    relay.ok("PATCH", f"/admin/tenants/{created['tenant_id']}", {"status": "disabled"})
    _assert_openai_error(_post(relay, CHAT, created["key"]), 401)


def test_model_allow_list(relay):
    created = relay.new_key(models=["plain-model"])
    error = _assert_openai_error(_post(relay, CHAT, created["key"]), 403, "model")
    # Never the words that make ONE API disable a whole channel.
    assert error["type"] != "permission_error" and "permission denied" not in error["message"].lower()
    with pytest.raises(openai.PermissionDeniedError):
        relay.client(created["key"]).chat.completions.create(**CHAT)
    ok = relay.client(created["key"]).chat.completions.create(model="plain-model", messages=CHAT["messages"])
    assert ok.choices[0].message.content == "Hello from plain-model"


def test_ip_allow_list(relay):
    elsewhere = relay.new_key(ip_allow=["10.0.0.0/8", "2001:db8::/32"])
    _assert_openai_error(_post(relay, CHAT, elsewhere["key"]), 403)
    here = relay.new_key(ip_allow=["127.0.0.1/32"])
    assert _post(relay, CHAT, here["key"]).status_code == 200
    # The tests' relay trusts X-Forwarded-For from 127.0.0.1 (RELAY_TRUSTED_PROXIES): the real client counts.
    assert _post(relay, CHAT, here["key"], headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 403
    assert _post(relay, CHAT, elsewhere["key"], headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200


def test_unknown_model_is_404(relay):
    created = relay.new_key()
    error = _assert_openai_error(_post(relay, {**CHAT, "model": "does-not-exist"}, created["key"]), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        relay.client(created["key"]).chat.completions.create(model="does-not-exist", messages=CHAT["messages"])


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "gpt-x"}, "messages"),
    ({"messages": CHAT["messages"]}, "model"),
    ({**CHAT, "messages": []}, "messages"),
    ({**CHAT, "messages": "hi"}, "messages"),
    ({**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({**CHAT, "temperature": 2.5}, "temperature"),
    ({**CHAT, "temperature": "warm"}, "temperature"),
    ({**CHAT, "top_p": -0.1}, "top_p"),
    ({**CHAT, "n": 0}, "n"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "presence_penalty": 3}, "presence_penalty"),
    ({**CHAT, "top_logprobs": 21}, "top_logprobs"),
    ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({**CHAT, "stream": "yes please"}, "stream"),
    ({**CHAT, "stream": 1}, "stream"),
    ({**CHAT, "temperature": "0.5"}, "temperature"),
    ({**CHAT, "n": True}, "n"),
    ({**CHAT, "max_tokens": "5"}, "max_tokens"),
])
def test_invalid_body_is_400_naming_the_parameter(relay, calls, body, param):
    created = relay.new_key()
    error = _assert_openai_error(_post(relay, body, created["key"]), 400, param)
    assert error["type"] == "invalid_request_error"
    assert calls == []  # nothing invalid reaches the upstream


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'{"model": "gpt-x", "temperature": NaN}'])
def test_unparseable_body_is_400(relay, raw):
    created = relay.new_key()
    _assert_openai_error(_post(relay, None, created["key"], raw=raw), 400)


def test_sdk_sees_bad_request(relay):
    created = relay.new_key()
    with pytest.raises(openai.BadRequestError) as exc:
        relay.client(created["key"]).chat.completions.create(**CHAT, temperature=5)
    assert exc.value.body["param"] == "temperature"


def test_completions_validation(relay):
    created = relay.new_key()
    response = httpx.post(relay.url + "/v1/completions", json={"model": "gpt-x"}, timeout=30,
                          headers={"Authorization": f"Bearer {created['key']}"})
    _assert_openai_error(response, 400, "prompt")


def test_rejected_requests_are_logged(relay):
    created = relay.new_key(models=["plain-model"])
    assert _post(relay, CHAT, created["key"]).status_code == 403
    assert _post(relay, {**CHAT, "temperature": 9}, created["key"]).status_code == 400
    rows = relay.logs(created["tenant_id"], want=2)
    assert sorted((r["status_code"], r["error_type"]) for r in rows) == [(400, "invalid_value"), (403, "forbidden")]


def test_stream_options_without_stream_is_dropped(relay, calls):
    created = relay.new_key()
    response = _post(relay, {**CHAT, "stream_options": {"include_usage": True}}, created["key"])
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"
    assert "stream_options" not in calls[-1]["body"]


def test_odd_values_never_block_the_request_log(relay, upstream):
    """A 201-character model name (PostgreSQL's varchar(200)), a NUL byte and an upstream reporting 10**20
    tokens are all answered, and every later request is still logged and counted."""
    from tests.conftest import add_fake_channel

    if not any(c["name"] == "huge" for c in relay.ok("GET", "/admin/channels")):
        add_fake_channel(relay, upstream[1], "huge", ["huge-usage"])
    created = relay.new_key()
    assert _post(relay, {**CHAT, "model": "z" * 201}, created["key"]).status_code == 404
    assert _post(relay, {**CHAT, "model": "m\u0000"}, created["key"]).status_code == 404
    huge = _post(relay, {**CHAT, "model": "huge-usage"}, created["key"])
    assert huge.status_code == 200 and huge.json()["usage"]["prompt_tokens"] == 2**31 - 1
    assert _post(relay, CHAT, created["key"]).status_code == 200
    rows = relay.logs(created["tenant_id"], want=4)
    assert len(rows) == 4
    assert {r["status_code"] for r in rows} == {404, 200}
