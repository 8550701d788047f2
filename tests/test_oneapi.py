"""Being an upstream of ONE API / new-api: their channel tests and relay requests replayed exactly as they
send them, judged by their own criteria; and importing channels from a ONE API database."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT

ONE_API_TEST_PROMPT = "Output only your specific model name with no additional text."


def _passes_one_api_channel_test(response: httpx.Response) -> bool:
    """controller/channel-test.go: HTTP 200, a usage block, a string choices[0].message.content."""
    if response.status_code != 200:
        return False
    body = response.json()
    return "usage" in body and isinstance(body["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("base", ["", "/v1"])  # type 1: base_url + /v1/...; type 50: /v1 inside base_url
def test_one_api_channel_test(relay, base):
    key = relay.new_key()["key"]
    url = relay.url + base + ("/chat/completions" if base else "/v1/chat/completions")
    response = httpx.post(url, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                          content=json.dumps({"model": "gpt-x", "messages": [
                              {"role": "user", "content": ONE_API_TEST_PROMPT}]}), timeout=30)
    assert _passes_one_api_channel_test(response)


def test_new_api_channel_test(relay):
    key = relay.new_key()["key"]
    response = httpx.post(relay.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "gpt-x", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
                          timeout=30)
    assert _passes_one_api_channel_test(response)


@pytest.mark.parametrize("include_usage", [True, False])
def test_streams_as_one_api_and_new_api_send_them(relay, include_usage):
    key = relay.new_key()["key"]
    body = {"model": "gpt-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    if include_usage:  # new-api forces it so it can bill from the stream
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", relay.url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        events = [e.removeprefix("data: ") for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    with_usage = [c for c in chunks if c.get("usage")]
    assert (len(with_usage) == 1 and with_usage[0]["usage"]["total_tokens"] > 0) if include_usage else not with_usage


@pytest.mark.parametrize("temperature", [None, 0])  # older ONE API drops temperature: 0 entirely
def test_missing_or_zero_temperature(relay, calls, temperature):
    key = relay.new_key()["key"]
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}
    if temperature is not None:
        body["temperature"] = temperature
    response = httpx.post(relay.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert calls[-1]["body"].get("temperature") == temperature


def test_revoked_relay_key_is_what_makes_one_api_disable_the_channel(relay):
    """The one error that should disable the ONE API channel: its relay key is bad (401)."""
    response = httpx.post(relay.url + "/v1/chat/completions", json={"model": "gpt-x", "messages": []},
                          headers={"Authorization": "Bearer sk-revoked"}, timeout=30)
    assert response.status_code == 401


# ONE API's channels table as GORM creates it on SQLite (model/channel.go).
ONE_API_SCHEMA = """
CREATE TABLE `channels` (`id` integer,`type` integer DEFAULT 0,`key` text NOT NULL,`status` integer DEFAULT 1,
`name` text,`weight` integer DEFAULT 0,`created_time` bigint,`test_time` bigint,`response_time` integer,
`base_url` text DEFAULT '',`other` text,`balance` real,`balance_updated_time` bigint,`models` text,
`group` varchar(32) DEFAULT 'default',`used_quota` bigint DEFAULT 0,`model_mapping` varchar(1024) DEFAULT '',
`priority` bigint DEFAULT 0,`config` text,`system_prompt` text,`ratelimit` integer DEFAULT 0,PRIMARY KEY (`id`));
CREATE INDEX `idx_channels_key` ON `channels`(`key`);
CREATE INDEX `idx_channels_name` ON `channels`(`name`);
"""
ROWS = [  # id, type, key, status, name, weight, base_url, models, model_mapping, priority, config
    (1, 1, "sk-openai", 1, "openai-main", 10, "", "gpt-4o,gpt-4o-mini", '{"gpt-4o-mini": "gpt-4o-mini-2024-07-18"}',
     5, ""),
    (2, 50, "sk-vllm", 1, "vllm", 0, "http://10.0.0.5:8000/v1", "qwen2.5-7b", "", 0, ""),
    (3, 14, "sk-ant", 2, "claude", 1, "", "claude-3-5-haiku", "", 0, ""),
    (4, 3, "azure-key", 3, "azure", 1, "https://x.openai.azure.com", "gpt-4", "", 0, '{"api_version": "2024-06-01"}'),
    (5, 17, "ali-key", 1, "qwen-dashscope", 1, "", "qwen-max", "", 0, ""),
    (6, 8, "k", 1, "custom-no-url", 1, "", "m", "", 0, ""),
]


def test_import_oneapi(tmp_path):
    source = tmp_path / "one-api.db"
    with sqlite3.connect(source) as conn:
        conn.executescript(ONE_API_SCHEMA)
        conn.executemany("INSERT INTO channels (id, type, key, status, name, weight, base_url, models, model_mapping,"
                         " priority, config) VALUES (?,?,?,?,?,?,?,?,?,?,?)", ROWS)
    target = f"sqlite:///{tmp_path / 'relay.db'}"
    env = {**os.environ, "RELAY_DATABASE_URL": target}

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "admin.cli", "import-oneapi", "--database-url",
                                 f"sqlite:///{source}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout

    dry = cli()
    assert "4 channel(s) would create" in dry and "not supported" in dry and "needs a base_url" in dry
    from sqlalchemy import create_engine, text

    engine = create_engine(target)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM channels")).scalar() == 0  # a dry run writes nothing
    assert "4 channel(s) created" in cli("--apply")
    with engine.connect() as conn:
        rows = {r.name: r for r in conn.execute(text("SELECT * FROM channels"))}
        audited = conn.execute(text("SELECT actor, action, entity, entity_id FROM audit_events")).all()
    engine.dispose()
    # written through the service layer: each channel audited with actor `import`
    assert sorted(audited) == sorted(("import", "create", "channel", r.id) for r in rows.values())
    assert set(rows) == {"openai-main", "vllm", "claude", "azure"}
    main = rows["openai-main"]
    assert (main.type, main.base_url, main.priority, main.weight, main.status) == (
        "openai", "https://api.openai.com", 5, 10, "enabled")
    assert json.loads(main.models) == ["gpt-4o", "gpt-4o-mini"]
    assert json.loads(main.model_mapping) == {"gpt-4o-mini": "gpt-4o-mini-2024-07-18"}
    from relay.secrets import box_from_env

    assert main.api_key != "sk-openai" and box_from_env(target).decrypt(main.api_key) == "sk-openai"  # encrypted
    assert rows["vllm"].base_url == "http://10.0.0.5:8000/v1" and rows["vllm"].weight == 1
    assert rows["claude"].type == "litellm" and rows["claude"].status == "disabled"
    assert json.loads(rows["claude"].model_mapping) == {"claude-3-5-haiku": "anthropic/claude-3-5-haiku"}
    assert rows["azure"].status == "auto_disabled"
    assert json.loads(rows["azure"].options) == {"api_version": "2024-06-01"}
