"""X-Request-Id end to end: taken from the client when sane, made otherwise, returned on every answer, sent
upstream, stored on the request-log row and named in every log line of the request; JSON log lines."""

from __future__ import annotations

import json
import re
import time

import httpx

from tests.conftest import add_fake_channel, run_relay


def _chat(relay, key: str, model: str, request_id: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", **({"X-Request-Id": request_id} if request_id else {})}
    return httpx.post(relay.url + "/v1/chat/completions", headers=headers, timeout=30,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def _lines(relay, want: str, timeout: float = 10) -> list[str]:
    deadline = time.time() + timeout
    while True:
        lines = relay.log_path.read_text().splitlines()
        if any(want in line for line in lines) or time.time() > deadline:
            return lines
        time.sleep(0.1)


def test_request_ids_follow_a_request_and_log_lines_are_json(tmp_path, upstream, calls):
    env = {"RELAY_LOG_FORMAT": "json"}
    with run_relay(f"sqlite:///{tmp_path / 'r.db'}", tmp_path, "--log-level", "info", "--access-log",
                   env=env) as relay:
        add_fake_channel(relay, upstream[1], "broken", ["rid-model"], priority=10,
                         model_mapping={"rid-model": "fail-500"})
        add_fake_channel(relay, upstream[1], "good", ["rid-model"], priority=0)
        key = relay.new_key()
        time.sleep(1)  # the catalog poll (RELAY_CONFIG_POLL_S=0.5)

        answer = _chat(relay, key["key"], "rid-model", "client-id.42:abc")
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-request-id"] == "client-id.42:abc"
        # Both upstream calls (the failing channel, then the failover) carried the client's id.
        assert [c["request_id"] for c in calls] == ["client-id.42:abc", "client-id.42:abc"]

        for bad in ("x" * 129, "has space", "semi;colon", "-", ".dot-first", ""):
            made = _chat(relay, key["key"], "rid-model", bad or None).headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", made), made
        refused = httpx.post(relay.url + "/v1/chat/completions", headers={"X-Request-Id": "no-key-1"}, json={})
        assert refused.status_code == 401 and refused.headers["x-request-id"] == "no-key-1"
        assert httpx.get(relay.url + "/health/live", headers={"X-Request-Id": "probe-7"}).headers[
            "x-request-id"] == "probe-7"
        guarded = httpx.get(relay.url + "/admin/tenants", headers={"X-Request-Id": "adm-1"})  # the admin guard
        assert guarded.status_code == 401 and guarded.headers["x-request-id"] == "adm-1"
        # Each of the seven chats above failed over from `broken` to `good` once; none from `good`.
        metrics = httpx.get(relay.url + "/metrics").text
        assert 'relay_failovers_total{channel="broken"} 7.0' in metrics, metrics
        assert 'relay_failovers_total{channel="good"}' not in metrics

        rows = relay.logs(key["tenant_id"], want=7)
        found = relay.ok("GET", "/admin/logs?request_id=client-id.42:abc")["data"]
        assert [row["request_id"] for row in found] == ["client-id.42:abc"]
        assert "client-id.42:abc" in {row["request_id"] for row in rows}
        assert all(row["request_id"] for row in rows)

        lines = _lines(relay, '"client-id.42:abc"')
        # Every log line is JSON; the only other output is the new database's first key, printed on stdout.
        banner = [line for line in lines if line.startswith("New database") or line.strip().startswith("sk-")]
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert records and len(records) + len(banner) == len([line for line in lines if line.strip()]), lines[:5]
        mine = [r for r in records if r["request_id"] == "client-id.42:abc"]
        # the failover's warning and the access-log line of that request both name it
        assert any(r["logger"] == "relay.dispatch" and "broken" in r["message"] for r in mine), mine
        access = [r for r in mine if r["logger"] == "uvicorn.access"]
        assert access and access[0]["status"] == 200 and access[0]["path"] == "/v1/chat/completions"
        assert all(r["request_id"] == "-" for r in records if "Started server process" in r["message"])


def test_plain_log_lines_name_the_request(tmp_path, upstream):
    with run_relay(f"sqlite:///{tmp_path / 'p.db'}", tmp_path) as relay:  # --log-level warning
        add_fake_channel(relay, upstream[1], "down", ["plain-rid"], model_mapping={"plain-rid": "fail-503"})
        key = relay.new_key()
        time.sleep(1)
        assert _chat(relay, key["key"], "plain-rid", "plain-id-9").status_code == 502
        # one channel, nothing tried after its failure: not a failover
        assert 'relay_failovers_total{channel="down"}' not in httpx.get(relay.url + "/metrics").text
        lines = _lines(relay, "[plain-id-9]")
        assert any("[plain-id-9]" in line and "channel down failed" in line for line in lines), lines[-5:]
