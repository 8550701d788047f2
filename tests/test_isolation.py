"""What one tenant can never get from another or from the operator: a deleted tenant's cache and history, an
old database's Redis, the operator's premium tier or provider-side storage, the upstream secrets (encrypted at
rest); and what an operator's typo can never do (a 500, a channel that fails later)."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import uuid

import httpx
import pytest
import redis

from relay import db
from relay.secrets import PREFIX, box_from_env
from tests.conftest import ROOT, SECRET_KEY, add_fake_channel, postgres_database, run_relay

REDIS_URL = "redis://127.0.0.1:6379/6"
GREEDY = {"model": "gpt-x", "temperature": 0, "messages": [{"role": "user", "content": "cache me"}]}


def _ask(relay, key: str, body: dict) -> httpx.Response:
    return httpx.post(relay.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"})


def test_a_new_tenant_never_inherits_a_deleted_ones_id(tmp_path, upstream):
    """SQLite reused the highest id after its row was deleted: the newcomer got its cache and its history."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    with run_relay(f"sqlite:///{tmp_path / 'ids.db'}", tmp_path, env={"RELAY_REDIS_URL": REDIS_URL}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["gpt-x"])
        old = relay.new_key()
        assert _ask(relay, old["key"], GREEDY).headers["x-relay-cache"] == "miss"
        assert _ask(relay, old["key"], GREEDY).headers["x-relay-cache"] == "hit"
        relay.logs(old["tenant_id"], want=2)
        relay.ok("DELETE", f"/admin/tenants/{old['tenant_id']}")
        new = relay.new_key()
        assert new["tenant_id"] > old["tenant_id"] and new["id"] > old["id"]
        assert _ask(relay, new["key"], GREEDY).headers["x-relay-cache"] == "miss"
        history = relay.logs(new["tenant_id"])
        assert [row["cache"] for row in history] == ["miss"]  # only its own request


def test_a_recreated_database_never_reads_the_old_redis(tmp_path, upstream):
    redis.Redis.from_url(REDIS_URL).flushdb()
    path = tmp_path / "again.db"
    env = {"RELAY_REDIS_URL": REDIS_URL}
    tenant_ids = []
    for _ in range(2):  # the same path, the same tenant id, the same Redis: still a miss the second time
        with run_relay(f"sqlite:///{path}", tmp_path, env=env) as relay:
            add_fake_channel(relay, upstream[1], "fake", ["gpt-x"])
            key = relay.new_key()
            tenant_ids.append(key["tenant_id"])
            assert _ask(relay, key["key"], GREEDY).headers["x-relay-cache"] == "miss"
            assert _ask(relay, key["key"], GREEDY).headers["x-relay-cache"] == "hit"
        for leftover in tmp_path.glob("again.db*"):
            if not leftover.name.endswith(".secret-key"):
                leftover.unlink()
    assert tenant_ids[0] == tenant_ids[1]


def test_premium_and_storage_fields_do_not_reach_the_upstream(relay, upstream, calls):
    key_row = relay.new_key()
    key = key_row["key"]
    extras = {"store": True, "service_tier": "priority", "user": "alice@example.com", "safety_identifier": "u-1",
              "prompt_cache_key": "k", "top_k": 5}
    response = _ask(relay, key, {**GREEDY, "temperature": 0.5, **extras})
    assert response.status_code == 200
    sent = calls[-1]["body"]
    assert not {"store", "service_tier", "user", "safety_identifier", "prompt_cache_key"} & set(sent)
    assert sent["top_k"] == 5  # a sampling extra: passes by default
    rewrites = response.headers["x-relay-rewrites"]
    assert "store:true->unset" in rewrites and 'service_tier:"<string>"->unset' in rewrites
    assert "alice" not in rewrites and "alice" not in str(relay.logs(key_row["tenant_id"]))  # never kept
    # The operator decides per channel what else passes.
    model = f"tiered-{uuid.uuid4().hex[:6]}"
    add_fake_channel(relay, upstream[1], model, [model], passthrough=["service_tier"])
    assert _ask(relay, key, {**GREEDY, "model": model, **extras}).status_code == 200
    assert calls[-1]["body"]["service_tier"] == "priority" and "store" not in calls[-1]["body"]


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:99999", "http://:80/v1", "ftp://x", "http://a b.com",
                                      "http://127.0.0.1:0"])
def test_bad_channel_urls_are_400(relay, base_url):
    response = relay.admin("POST", "/admin/channels", {"name": f"bad-{uuid.uuid4().hex[:6]}", "type": "openai",
                                                       "base_url": base_url, "models": ["m"]})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "base_url"


def test_duplicates_are_409_on_create_and_rename(relay):
    name = f"dup-{uuid.uuid4().hex[:6]}"
    first = relay.ok("POST", "/admin/tenants", {"name": name})
    assert relay.admin("POST", "/admin/tenants", {"name": name}).status_code == 409
    other = relay.ok("POST", "/admin/tenants", {"name": name + "-2"})
    response = relay.admin("PATCH", f"/admin/tenants/{other['id']}", {"name": name})
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"
    assert relay.ok("GET", f"/admin/tenants/{first['id']}")["name"] == name


def test_upstream_secrets_are_encrypted_at_rest(relay, upstream):
    name = f"secret-{uuid.uuid4().hex[:6]}"
    channel = add_fake_channel(relay, upstream[1], name, [name], api_key="upstream-secret",
                               options={"extra_headers": {"Authorization": "Bearer nested-secret"}, "x": 1})
    from sqlalchemy import create_engine, text

    engine = create_engine(db.normalise_url(relay.database_url))
    with engine.connect() as conn:
        row = conn.execute(text("SELECT api_key, options FROM channels WHERE id = :i"), {"i": channel["id"]}).one()
    engine.dispose()
    assert row.api_key.startswith(PREFIX) and "upstream-secret" not in row.api_key
    assert "nested-secret" not in str(row.options)
    # ... and still work: the upstream checks the key.
    assert _ask(relay, relay.new_key()["key"], {**GREEDY, "model": name}).status_code == 200


def _serve_once(url: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "admin.cli", "serve", "--port", "1"], cwd=ROOT, timeout=120,
                          capture_output=True, text=True,
                          env={**os.environ, "RELAY_DATABASE_URL": url, "RELAY_REDIS_URL": "none", **env})


def test_key_file_beside_sqlite_and_a_wrong_key_refuses_to_start(tmp_path, upstream):
    url = f"sqlite:///{tmp_path / 'keyed.db'}"
    with run_relay(url, tmp_path, env={"RELAY_SECRET_KEY": ""}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["gpt-x"])
    key_file = tmp_path / "keyed.db.secret-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in relay.log_path.read_text()  # the log says where the key is
    refused = _serve_once(url, {"RELAY_SECRET_KEY": SECRET_KEY})
    assert refused.returncode == 2 and "not the key this database" in refused.stderr
    with run_relay(url, tmp_path, env={"RELAY_SECRET_KEY": ""}) as relay:  # the file's key works again
        assert _ask(relay, relay.new_key()["key"], GREEDY).status_code == 200


def test_postgres_without_a_key_refuses_to_start():
    with postgres_database() as url:
        refused = _serve_once(url, {"RELAY_SECRET_KEY": ""})
    assert refused.returncode == 2 and "Set RELAY_SECRET_KEY" in refused.stderr


def _plaintext_channel(path, options: dict) -> None:
    """A channel row as versions before encryption wrote it (api_key 'plain-key')."""
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO channels (name, type, api_key, models, model_mapping, priority, weight, status, "
                     "timeout_s, retries, options, capabilities, created_at, updated_at) VALUES ('c', 'openai', "
                     "'plain-key', '[\"m\"]', '{}', 0, 1, 'enabled', 60, 0, ?, '{}', '2026-01-01', '2026-01-01')",
                     (json.dumps(options),))


def test_the_migration_encrypts_existing_plaintext_secrets(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0002")
    _plaintext_channel(tmp_path / "old.db", {"aws_secret_access_key": "S3SECRET"})
    monkeypatch.setenv("RELAY_SECRET_KEY", SECRET_KEY)
    db.upgrade(url)
    with sqlite3.connect(tmp_path / "old.db") as conn:
        api_key, options = conn.execute("SELECT api_key, options FROM channels").fetchone()
    box = box_from_env(url)
    assert api_key.startswith(PREFIX) and box.decrypt(api_key) == "plain-key"
    assert "S3SECRET" not in options
    assert box.open_options(json.loads(options)) == {"aws_secret_access_key": "S3SECRET"}


def test_a_channels_passthrough_never_removes_what_the_policy_set(relay, upstream, calls):
    """qwen1.5 makes temperature 0 greedy as top_k 1: a channel that lets `user` through must still get top_k."""
    model = f"q15-{uuid.uuid4().hex[:6]}"
    add_fake_channel(relay, upstream[1], model, [model], passthrough=["user"])
    relay.ok("POST", "/admin/policies", {"model_pattern": model, "preset": "qwen1.5"})
    response = _ask(relay, relay.new_key()["key"], {**GREEDY, "model": model})
    assert response.status_code == 200
    assert calls[-1]["body"]["top_k"] == 1 and calls[-1]["body"]["temperature"] >= 0.5


@pytest.mark.parametrize(("path", "body"), [
    ("/admin/keys", {"expires_at": "9999-12-31T23:59:59-14:00"}),
    ("/admin/keys", {"expires_at": "0001-01-01T00:00:00+14:00"}),
    ("/admin/keys", {"models": []}),
    ("/admin/keys", {"ip_allow": []}),
    ("/admin/tenants", {"rpm": 0}),
])
def test_admin_values_out_of_range_are_400(relay, path, body):
    tenant = relay.ok("POST", "/admin/tenants", {"name": f"r-{uuid.uuid4().hex[:8]}"})
    payload = {"tenant_id": tenant["id"], **body} if path == "/admin/keys" else {"name": "x" + uuid.uuid4().hex, **body}
    response = relay.admin("POST", path, payload)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == next(iter(body))


@pytest.mark.parametrize("query", ["/admin/usage?since=0001-01-01T00:00:00%2B14:00",
                                   "/admin/usage?until=9999-12-31T23:59:59-14:00",
                                   "/admin/usage?model=%00", "/admin/audit?entity=%00",
                                   "/admin/cache?model=%00"])
def test_admin_filters_out_of_range_are_400(relay, query):
    method = "DELETE" if query.startswith("/admin/cache") else "GET"
    response = relay.admin(method, query)
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_a_database_encrypted_with_another_key_is_refused(tmp_path, monkeypatch):
    """Migrated (and encrypted) with key A; a first start with key B must be refused, not pin B."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    db.upgrade(url, "0002")
    _plaintext_channel(tmp_path / "a.db", {})
    monkeypatch.setenv("RELAY_SECRET_KEY", SECRET_KEY)
    db.upgrade(url)
    from relay.secrets import new_key

    refused = _serve_once(url, {"RELAY_SECRET_KEY": new_key()})
    assert refused.returncode == 2 and "not the key this database" in refused.stderr
    # Rotation: a new key first, the old one after it; the channel (encrypted with the old one) still loads.
    with run_relay(url, tmp_path, env={"RELAY_SECRET_KEY": f"{new_key()},{SECRET_KEY}"}) as relay:
        assert [m["id"] for m in relay.client(relay.new_key()["key"]).models.list().model_dump()["data"]] == ["m"]
