"""Model policies end to end: the admin API, rewrites on real requests (to the real tiny-Qwen worker and to
a plain-transformers upstream that crashes the way reference article 000 describes), JSON retry, and
edits reaching a second gateway process."""

from __future__ import annotations

import time

import httpx
import pytest

from backends.loading import load
from tests.conftest import add_fake_channel, postgres_database, run_relay
from tests.fake_upstream import ServerThread
from tests.net import free_port
from tests.plain_generate_upstream import PlainGenerateUpstream

ASK = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def relay_with_worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policies")
    url = f"sqlite:///{tmp / 'policies.db'}"
    with run_relay(url, tmp, "--with-worker", "tiny-qwen2", "--worker-port", str(free_port())) as relay:
        yield relay


def _chat(relay, key: str, **body) -> httpx.Response:
    return httpx.post(relay.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                      json={"messages": ASK, "max_tokens": 4, **body})


def test_admin_policy_crud_versions_and_audit(relay):
    presets = relay.ok("GET", "/admin/policies/presets")
    assert {"qwen1.5", "qwen2.5", "safe-default"} <= set(presets)
    assert presets["qwen1.5"]["greedy_as"] == "top_k_one"
    created = relay.ok("POST", "/admin/policies", {"model_pattern": "crud-*", "preset": "qwen2.5"})
    assert created["version"] == 1 and created["rules"]["temperature"]["by_task"]["json"] == 0.4
    edited = relay.ok("PATCH", f"/admin/policies/{created['id']}", {"rules": {"temperature": {"min": 0.3}}})
    assert edited["version"] == 2 and edited["rules"]["temperature"] == {"min": 0.3, "by_task": {}}
    events = [e for e in relay.ok("GET", "/admin/audit?entity=policy")["data"] if e["entity_id"] == created["id"]]
    assert [e["action"] for e in events] == ["update", "create"]
    assert events[0]["before"]["version"] == 1 and events[0]["after"]["version"] == 2
    relay.ok("DELETE", f"/admin/policies/{created['id']}")
    assert relay.admin("GET", f"/admin/policies/{created['id']}").status_code == 404


@pytest.mark.parametrize(("body", "param"), [
    ({"model_pattern": "x", "rules": {"temperature": {"min": 5}}}, "rules.temperature.min"),
    ({"model_pattern": "x", "rules": {"top_p": {"min": 0.9, "max": 0.1}}}, "rules.top_p"),
    ({"model_pattern": "x", "rules": {"json_retry": {"attempts": 99}}}, "rules.json_retry.attempts"),
    ({"model_pattern": "x", "rules": {"tempreature": {}}}, "rules.tempreature"),
    ({"model_pattern": "x", "preset": "qwen9"}, "preset"),
    ({"model_pattern": "x"}, None),
])
def test_invalid_policies_are_400_naming_the_field(relay, body, param):
    response = relay.admin("POST", "/admin/policies", body)
    assert response.status_code == 400, response.text
    if param:
        assert response.json()["error"]["param"] == param


def test_explain(relay):
    relay.ok("POST", "/admin/policies", {"model_pattern": "explain-model", "preset": "qwen1.5"})
    time.sleep(0.1)
    answer = relay.ok("POST", "/admin/policies/explain", {"request": {"model": "explain-model", "messages": ASK,
                                                                       "temperature": 0.2}})
    assert answer["policy"].endswith("@1") and answer["task"] == "chat"
    assert answer["request"]["temperature"] == 0.5
    assert answer["rewrites"] == [{"param": "temperature", "from": 0.2, "to": 0.5, "rule": "temperature.min"}]
    none = relay.ok("POST", "/admin/policies/explain", {"request": {"model": "unmatched-xyz", "messages": ASK}})
    assert none["policy"] is None and none["rewrites"] == []


@pytest.mark.parametrize("top_p", [0, 1])
@pytest.mark.parametrize("temperature", [0, 1e-40, 0.2, 0.7, 2])
def test_every_temperature_answers_through_the_worker(relay_with_worker, temperature, top_p):
    relay = relay_with_worker
    if not relay.ok("GET", "/admin/policies"):
        relay.ok("POST", "/admin/policies", {"model_pattern": "tiny-*", "preset": "qwen1.5"})
        time.sleep(0.1)
    key = relay.new_key()["key"]
    response = _chat(relay, key, model="tiny-qwen2", temperature=temperature, top_p=top_p)
    assert response.status_code == 200, response.text
    assert response.headers["x-relay-policy"].endswith("@1")
    rewrites = response.headers["x-relay-rewrites"]
    if temperature < 0.01:
        assert "top_k:unset->1" in rewrites and f"temperature:{temperature}->0.7" in rewrites
    elif temperature < 0.5:
        assert rewrites.startswith("temperature:0.2->0.5")
    else:
        assert "temperature" not in rewrites
    assert ("top_p:0->0.01" in rewrites) == (top_p == 0)
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def plain_upstream():
    upstream = PlainGenerateUpstream(load("tiny-qwen2"))
    with ServerThread(upstream) as server:
        yield upstream, server.url


@pytest.mark.parametrize("temperature", [0, 1e-40])
def test_article_failure_reproduced_and_cured(relay, plain_upstream, temperature):
    """Plain transformers sampling crashes at these temperatures; the qwen1.5 preset makes them answer."""
    upstream, url = plain_upstream
    direct = httpx.post(url + "/v1/chat/completions", timeout=60,
                        json={"model": "qwen1.5-chat", "messages": ASK, "temperature": temperature, "max_tokens": 4})
    assert direct.status_code == 500
    if temperature:  # the article's exact failure (torch quotes inf and nan with backticks)
        assert "probability tensor contains either" in direct.json()["error"]["message"]
    name = f"plain-{relay.url.rsplit(':', 1)[1]}"
    if not any(c["name"] == name for c in relay.ok("GET", "/admin/channels")):
        add_fake_channel(relay, url, name, ["qwen1.5-chat"])
        relay.ok("POST", "/admin/policies", {"model_pattern": "qwen1.5-*", "preset": "qwen1.5"})
        time.sleep(0.1)
    key = relay.new_key()["key"]
    cured = _chat(relay, key, model="qwen1.5-chat", temperature=temperature)
    assert cured.status_code == 200, cured.text
    sent = upstream.bodies[-1]
    assert sent["top_k"] == 1 and sent["temperature"] >= 0.5


def test_json_retry_cools_down_until_the_json_parses(relay, upstream, calls):
    name = f"json-{relay.url.rsplit(':', 1)[1]}"
    if not any(c["name"] == name for c in relay.ok("GET", "/admin/channels")):
        add_fake_channel(relay, upstream[1], name, ["json-by-temperature"])
        relay.ok("POST", "/admin/policies", {"model_pattern": "json-by-temperature", "rules": {
            "temperature": {"greedy_below": 0.05, "default": 0.9},
            "json_retry": {"attempts": 3, "temperature_step": -0.2}}})
        time.sleep(0.1)
    key = relay.new_key()
    response = _chat(relay, key["key"], model="json-by-temperature", response_format={"type": "json_object"},
                     temperature=0.9)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == '{"answer": 42}'
    assert response.headers["x-relay-json-attempts"] == "3"
    assert [c["body"]["temperature"] for c in calls] == [0.9, 0.7, 0.5]
    row = relay.logs(key["tenant_id"])[0]
    assert [r["rule"] for r in row["rewrites"]] == ["json_retry.1", "json_retry.2"]
    # Without response_format no retry happens.
    plain = _chat(relay, key["key"], model="json-by-temperature", temperature=0.9)
    assert "x-relay-json-attempts" not in plain.headers


def test_policy_edits_reach_a_second_process_within_two_seconds(tmp_path, upstream):
    with postgres_database() as url, run_relay(url, tmp_path, "--workers", "2",
                                               env={"RELAY_CONFIG_POLL_S": "1.0"}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["hot-model"])
        key = relay.new_key()["key"]
        time.sleep(1.5)

        def all_processes_show(expected: str) -> float:
            """When the first round of 12 requests that all show `expected` began (the round itself takes a
            while on a loaded 2-core machine: its length is the check's cost, not the propagation's)."""
            start = time.time()
            while time.time() - start < 5:
                began = time.time()
                seen = {_chat(relay, key, model="hot-model").headers["x-relay-policy"] for _ in range(12)}
                if seen == {expected}:
                    return began - start
                time.sleep(0.05)
            raise AssertionError(f"still {seen}, wanted {expected}")

        policy = relay.ok("POST", "/admin/policies", {"model_pattern": "hot-*", "preset": "safe-default"})
        assert all_processes_show(f"{policy['id']}@1") < 2.0
        relay.ok("PATCH", f"/admin/policies/{policy['id']}", {"priority": 3})
        assert all_processes_show(f"{policy['id']}@2") < 2.0
