"""The admin API: auth, CRUD for tenants/keys/channels, write-only channel keys, audit, usage."""

from __future__ import annotations

import time
import uuid

import openai
import pytest

from channels.base import ChannelCapabilities
from tests.conftest import add_fake_channel

SECRET = "sk-upstream-very-secret-value"


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_admin_requires_token(relay, token):
    response = relay.admin("GET", "/admin/tenants", token=token)
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_tenant_crud_and_conflict(relay):
    name = f"tenant-{_uid()}"
    tenant = relay.ok("POST", "/admin/tenants", {"name": name, "rpm": 60, "token_quota": 1000})
    assert tenant["name"] == name and tenant["rpm"] == 60 and tenant["used_tokens"] == 0
    duplicate = relay.admin("POST", "/admin/tenants", {"name": name})
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "conflict"
    assert relay.ok("PATCH", f"/admin/tenants/{tenant['id']}", {"tpm": 5000})["tpm"] == 5000
    assert any(t["id"] == tenant["id"] for t in relay.ok("GET", "/admin/tenants"))
    relay.ok("DELETE", f"/admin/tenants/{tenant['id']}")
    assert relay.admin("GET", f"/admin/tenants/{tenant['id']}").status_code == 404


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/admin/tenants", {}, "name"),
    ("/admin/tenants", {"name": "x", "rpm": -1}, "rpm"),
    ("/admin/tenants", {"name": "x", "colour": "red"}, "colour"),
    ("/admin/keys", {"tenant_id": 1, "ip_allow": ["not-an-ip"]}, "ip_allow"),
    ("/admin/channels", {"name": "c", "type": "nope", "models": ["m"]}, "type"),
    ("/admin/channels", {"name": "c", "type": "openai", "models": []}, "models"),
    ("/admin/channels", {"name": "c", "type": "openai", "models": ["m"], "base_url": "ftp://x"}, "base_url"),
    ("/admin/tenants", {"name": "a\u0000b"}, "name"),
    ("/admin/tenants", {"name": "x", "rpm": 99999999999}, "rpm"),
    ("/admin/tenants", {"name": "x", "token_quota": 10**20}, "token_quota"),
    ("/admin/keys", {"tenant_id": 99999999999999999999}, "tenant_id"),
    ("/admin/channels", {"name": "c", "type": "openai", "models": ["m"], "weight": 3000000000}, "weight"),
])
def test_admin_validation_is_openai_shaped_400(relay, path, body, param):
    response = relay.admin("POST", path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_key_for_unknown_tenant_is_404(relay):
    response = relay.admin("POST", "/admin/keys", {"tenant_id": 987654})
    assert response.status_code == 404 and response.json()["error"]["param"] == "tenant_id"


def test_channel_api_key_is_write_only(relay, upstream):
    name = f"wo-{_uid()}"
    created = add_fake_channel(relay, upstream[1], name, [f"m-{name}"], api_key=SECRET,
                               options={"extra_headers": {"X-Team": "a"}, "aws_secret_access_key": "hidden"})
    assert created["has_api_key"] is True
    responses = [created, relay.ok("GET", f"/admin/channels/{created['id']}"), relay.ok("GET", "/admin/channels"),
                 relay.ok("PATCH", f"/admin/channels/{created['id']}", {"weight": 3}),
                 relay.ok("GET", "/admin/audit?entity=channel")]
    for body in responses:
        assert SECRET not in str(body) and "hidden" not in str(body)
        assert "'api_key'" not in str(body) or "'api_key': '***'" in str(body)


def test_channel_edits_apply_to_the_next_request(relay, upstream, calls):
    model = f"edit-{_uid()}"
    channel = add_fake_channel(relay, upstream[1], f"ch-{model}", [model])
    client = relay.client(relay.new_key()["key"])
    ask = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    assert client.chat.completions.create(**ask).choices[0].message.content == f"Hello from {model}"
    relay.ok("PATCH", f"/admin/channels/{channel['id']}", {"model_mapping": {model: "renamed-upstream"}})
    assert client.chat.completions.create(**ask).choices[0].message.content == "Hello from renamed-upstream"
    relay.ok("PATCH", f"/admin/channels/{channel['id']}", {"status": "disabled"})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**ask)
    relay.ok("PATCH", f"/admin/channels/{channel['id']}", {"status": "enabled"})
    client.chat.completions.create(**ask)
    relay.ok("DELETE", f"/admin/channels/{channel['id']}")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**ask)


def test_key_patch_changes_allow_list(relay):
    created = relay.new_key(models=["plain-model"])
    client = relay.client(created["key"])
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    relay.ok("PATCH", f"/admin/keys/{created['id']}", {"models": None})
    client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])


def test_channel_test_endpoint_stores_outcome(relay, upstream):
    good = add_fake_channel(relay, upstream[1], f"good-{_uid()}", ["probe-model"])
    tested = relay.ok("POST", f"/admin/channels/{good['id']}/test")
    assert tested["last_test_ok"] is True and tested["last_test_latency_ms"] > 0
    bad = add_fake_channel(relay, upstream[1], f"bad-{_uid()}", ["probe-bad"],
                           model_mapping={"probe-bad": "fail-500"}, status="disabled")
    tested = relay.ok("POST", f"/admin/channels/{bad['id']}/test")
    assert tested["last_test_ok"] is False and "500" in tested["last_test_error"]


def test_audit_records_before_and_after(relay):
    tenant = relay.ok("POST", "/admin/tenants", {"name": f"aud-{_uid()}"})
    relay.ok("PATCH", f"/admin/tenants/{tenant['id']}", {"rpm": 7})
    events = [e for e in relay.ok("GET", "/admin/audit?entity=tenant")["data"] if e["entity_id"] == tenant["id"]]
    assert [e["action"] for e in events] == ["update", "create"]
    assert events[0]["before"]["rpm"] is None and events[0]["after"]["rpm"] == 7


def test_usage_aggregates_request_logs(relay):
    created = relay.new_key()
    client = relay.client(created["key"])
    for _ in range(2):
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    relay.logs(created["tenant_id"], want=2)
    deadline = time.time() + 5
    while True:
        rows = relay.ok("GET", f"/admin/usage?tenant_id={created['tenant_id']}")["data"]
        if rows or time.time() > deadline:
            break
    assert len(rows) == 1
    assert rows[0]["model"] == "gpt-x" and rows[0]["requests"] == 2 and rows[0]["total_tokens"] == 14
    assert rows[0]["errors"] == 0


@pytest.mark.parametrize("field", ["models", "model_mapping", "options", "capabilities", "name", "weight", "type",
                                   "status", "priority"])
def test_patch_null_on_a_required_field_is_400(relay, upstream, field):
    channel = add_fake_channel(relay, upstream[1], f"nul-{_uid()}", [f"m-{_uid()}"])
    response = relay.admin("PATCH", f"/admin/channels/{channel['id']}", {field: None})
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert relay.admin("GET", f"/admin/channels/{channel['id']}").status_code == 200


@pytest.mark.parametrize("path", ["/admin/channels/99999999999999999999999", "/admin/logs?tenant_id=99999999999999999",
                                  "/admin/usage?tenant_id=99999999999999999", "/admin/keys?tenant_id=-1"])
def test_out_of_range_ids_are_4xx(relay, path):
    response = relay.admin("GET", path)
    assert 400 <= response.status_code < 500, response.text
    assert "." not in (response.json()["error"]["param"] or "")


def test_nested_channel_secrets_are_redacted(relay, upstream):
    # Credentials in a URL would be stored in plain text: refused, with the field named.
    refused = relay.admin("POST", "/admin/channels", {
        "name": f"nested-{_uid()}", "type": "openai", "base_url": "https://user:PROVIDERSECRET3@example.invalid/v1",
        "models": [f"m-{_uid()}"]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "base_url"
    created = relay.ok("POST", "/admin/channels", {
        "name": f"nested-{_uid()}", "type": "openai", "base_url": "https://example.invalid/v1",
        "models": [f"m-{_uid()}"], "options": {"extra_headers": {"Authorization": "Bearer PROVIDERSECRET1",
                                                                 "X-Custom": "PROVIDERSECRET2"},
                                               "api_keys": ["PROVIDERSECRET4"]}})
    for body in (created, relay.ok("GET", f"/admin/channels/{created['id']}"), relay.ok("GET", "/admin/audit")):
        assert "PROVIDERSECRET" not in str(body)
    relay.ok("DELETE", f"/admin/channels/{created['id']}")


def test_capabilities_are_typed_and_shown_as_they_apply(relay, upstream):
    name = f"caps-{_uid()}"
    refused = relay.admin("POST", "/admin/channels", {"name": name, "type": "openai", "base_url": upstream[1],
                                                       "models": [name], "capabilities": {"telepathy": True}})
    assert refused.status_code == 400 and refused.json()["error"]["param"].startswith("capabilities")
    plain = add_fake_channel(relay, upstream[1], name, [name])
    defaults = ChannelCapabilities().model_dump()
    assert defaults["stream_usage"] is True and defaults["seeded_determinism"] is False
    assert plain["capabilities"] == defaults  # the type's defaults
    seeded = relay.ok("PATCH", f"/admin/channels/{plain['id']}", {"capabilities": {"seeded_determinism": True}})
    assert seeded["capabilities"] == {**defaults, "seeded_determinism": True}
    local = relay.ok("POST", "/admin/channels", {"name": f"local-{_uid()}", "type": "local", "models": [_uid()]})
    # what the local worker declares
    assert local["capabilities"]["seeded_determinism"] is True and local["capabilities"]["constrained_decoding"] is True
