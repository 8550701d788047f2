"""Several gateway processes on one database (`serve --workers N`), and the operator's shell commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.conftest import ROOT, add_fake_channel, postgres_database, run_relay
from tests.net import free_port


def test_workers_share_configuration_edits(tmp_path, upstream):
    """An edit made through one process reaches the others within the poll interval."""
    with postgres_database() as url, run_relay(url, tmp_path, "--workers", "2") as relay:
        add_fake_channel(relay, upstream[1], "fake", ["shared-model"])
        key = relay.new_key()
        ask = {"model": "shared-model", "messages": [{"role": "user", "content": "hi"}]}
        time.sleep(1.5)  # RELAY_CONFIG_POLL_S=0.5 in tests
        # New connections are spread over both worker processes; every one must know the key.
        for _ in range(20):
            fresh = relay.client(key["key"])
            assert fresh.chat.completions.create(**ask).choices[0].message.content == "Hello from shared-model"
            fresh.close()
        relay.ok("DELETE", f"/admin/keys/{key['id']}")
        time.sleep(1.5)
        for _ in range(10):
            with pytest.raises(openai.AuthenticationError):
                relay.client(key["key"]).chat.completions.create(**ask)


def _run_cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RELAY_DATABASE_URL": url}
    return subprocess.run([sys.executable, "-m", "admin.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _cli(url: str, *args: str) -> dict:
    result = _run_cli(url, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_shell_commands_set_up_a_working_key(tmp_path, upstream):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    subprocess.run([sys.executable, "-m", "admin.cli", "db", "upgrade"], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "RELAY_DATABASE_URL": url}, capture_output=True)
    tenant = _cli(url, "tenant", "create", "shell-tenant")
    _cli(url, "channel", "add", "--name", "fake", "--base-url", upstream[1], "--api-key", "upstream-secret",
         "--models", "shell-model,other", "--model-mapping", '{"shell-model": "mapped"}')
    key = _cli(url, "key", "create", "--tenant", "shell-tenant", "--models", "shell-model")
    assert key["tenant_id"] == tenant["id"] and key["key"].startswith("sk-")
    # The shell goes through the same service as the admin API: validated, refused cleanly, audited.
    duplicate = _run_cli(url, "tenant", "create", "shell-tenant")
    assert duplicate.returncode == 1 and "conflicts" in duplicate.stderr and "Traceback" not in duplicate.stderr
    bad = _run_cli(url, "channel", "add", "--name", "bad", "--base-url", "http://x:99999", "--models", "m")
    assert bad.returncode == 1 and "port" in bad.stderr and "Traceback" not in bad.stderr
    revoked = _cli(url, "key", "create", "--tenant", str(tenant["id"]))
    assert _cli(url, "key", "revoke", str(revoked["id"]))["status"] == "revoked"
    # The CLI encrypted the channel's key with the key file it made beside the database: the relay uses it too.
    with run_relay(url, tmp_path, env={"RELAY_TRUSTED_PROXIES": "", "RELAY_SECRET_KEY": ""}) as relay:
        answer = relay.client(key["key"]).chat.completions.create(
            model="shell-model", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Hello from mapped"
        # Without trusted proxies a forged X-Forwarded-For changes nothing.
        far = relay.new_key(ip_allow=["10.0.0.0/8"])
        forged = relay.client(far["key"], default_headers={"X-Forwarded-For": "10.1.2.3"})
        with pytest.raises(openai.PermissionDeniedError):
            forged.chat.completions.create(model="shell-model", messages=[{"role": "user", "content": "hi"}])
        actors = {(e["actor"], e["entity"], e["action"]) for e in relay.ok("GET", "/admin/audit?limit=1000")["data"]}
        assert {("cli", "tenant", "create"), ("cli", "channel", "create"), ("cli", "api_key", "create"),
                ("cli", "api_key", "revoke")} <= actors


def test_serve_with_worker_answers_offline(tmp_path):
    """`serve --with-worker MODEL` starts a worker, registers the `local` channel and, on a new database,
    prints a first key: the README's run command, on the tiny model."""
    url = f"sqlite:///{tmp_path / 'with-worker.db'}"
    worker_port = free_port()
    with run_relay(url, tmp_path, "--with-worker", "tiny-qwen2", "--worker-port", str(worker_port)) as relay:
        key = re.search(r"sk-[A-Za-z0-9_-]{43}", relay.log_path.read_text()).group(0)
        client = relay.client(key)
        raw = client.chat.completions.with_raw_response.create(
            model="tiny-qwen2", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=5)
        assert raw.headers["x-relay-channel"] == "local"
        assert raw.parse().usage.completion_tokens == 5
        chunks = list(client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=5, stream=True, seed=1,
                                                     stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 5
        assert [c.id for c in client.models.list()] == ["tiny-qwen2"]
        actors = {(e["actor"], e["entity"]) for e in relay.ok("GET", "/admin/audit")["data"]}
        assert {("bootstrap", "tenant"), ("bootstrap", "api_key"), ("bootstrap", "channel")} <= actors
    # The gateway is gone (SIGTERM): its worker must not stay behind holding the model.
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{worker_port}/health", timeout=1)
            time.sleep(0.2)
        except httpx.HTTPError:
            break
    else:
        raise AssertionError("the worker outlived its gateway")
