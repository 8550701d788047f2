"""Policy insights from live traffic: what a policy's answers turned out like per model, task and temperature
(JSON validity, errors, JSON retries, answers cut at max_tokens), the recommendation built on them, and
`temperature.adaptive` stepping a task's default by itself — through real relays on SQLite and PostgreSQL and
the fake upstream `json-by-temperature` (broken JSON above 0.5, valid at or below)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from admin.insights import Cell, adaptive_step, recommend
from relay.insights import Observation, bucket, judge, note
from relay.policy import PolicyOutcome
from relay.policy_rules import TemperatureRule
from tests.conftest import add_fake_channel, postgres_database, run_relay

ASK = [{"role": "user", "content": "Answer in JSON."}]
JSON = {"type": "json_object"}


def _setup(relay, upstream, mapping: dict[str, str], rules: dict[str, Any]) -> tuple[str, dict, str]:
    """A channel serving `prefix-<name>` as each upstream model, one policy over all of them, and a key."""
    prefix = f"ins-{uuid.uuid4().hex[:8]}"
    models = {f"{prefix}-{name}": target for name, target in mapping.items()}
    add_fake_channel(relay, upstream[1], prefix, list(models), model_mapping=models)
    policy = relay.ok("POST", "/admin/policies", {"model_pattern": f"{prefix}-*", "rules": rules})
    return prefix, policy, relay.new_key()["key"]


def _chat(relay, key: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(relay.url + "/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key}", **(headers or {})},
                      json={"messages": ASK, "max_tokens": 8, **body})


def _insights(relay, policy_id: int, requests: int, query: str = "") -> dict[str, Any]:
    """The policy's insights once `requests` answers are in (the log writer flushes every 0.2 s)."""
    deadline = time.time() + 10
    while True:
        body = relay.ok("GET", f"/admin/policies/{policy_id}/insights{query}")
        if sum(r["requests"] for r in body["rows"]) >= requests or time.time() > deadline:
            return body
        time.sleep(0.1)


def _cells(body: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
    return {(r["model"].rsplit("-", 1)[-1], r["task"], r["temperature"]): r for r in body["rows"]}


def test_json_validity_is_judged_per_temperature_and_the_warmest_valid_one_recommended(relay, upstream, calls):
    prefix, policy, key = _setup(relay, upstream, {"j": "json-by-temperature"},
                                 {"temperature": {"default": 0.7, "by_task": {"json": 0.8}}})
    model = f"{prefix}-j"
    for _ in range(6):
        assert _chat(relay, key, model=model, response_format=JSON).status_code == 200  # the task's 0.8: broken
    for temperature in (0.4,) * 6 + (0.4371,) * 2:  # a client's own 0.4371 joins the 0.45 bucket
        assert _chat(relay, key, model=model, response_format=JSON, temperature=temperature).status_code == 200
    # The client's own json_schema is part of validity: an answer missing a required field is invalid.
    for required in (["zzz"], ["zzz"], ["answer"]):
        schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object",
                                                                               "required": required}}}
        assert _chat(relay, key, model=model, response_format=schema, temperature=0.3).status_code == 200
    streamed = _chat(relay, key, model=model, response_format=JSON, stream=True)
    assert streamed.status_code == 200 and "data: [DONE]" in streamed.text  # a stream is judged too
    assert _chat(relay, key, model=model).status_code == 200  # chat at the default: nothing to judge
    # A hostile task name does not become a row of its own.
    assert _chat(relay, key, {"X-Relay-Task": f"evil-{uuid.uuid4().hex}"}, model=model).status_code == 200

    body = _insights(relay, policy["id"], 20, "?min_sample=5")
    cells = _cells(body)
    assert set(cells) == {("j", "json", 0.8), ("j", "json", 0.4), ("j", "json", 0.45), ("j", "json", 0.3),
                          ("j", "chat", 0.7), ("j", "other", 0.7)}
    hot, cool = cells[("j", "json", 0.8)], cells[("j", "json", 0.4)]
    assert (hot["requests"], hot["json_checked"], hot["json_valid"], hot["json_validity"]) == (7, 7, 0, 0.0)
    assert (cool["requests"], cool["json_checked"], cool["json_valid"]) == (6, 6, 6)
    assert (hot["source"], cool["source"]) == ("default", "client")  # who chose the temperature
    assert (cells[("j", "json", 0.3)]["json_checked"], cells[("j", "json", 0.3)]["json_valid"]) == (3, 1)
    assert cells[("j", "json", 0.45)]["json_valid"] == 2
    assert cells[("j", "chat", 0.7)]["json_checked"] == 0 and cells[("j", "other", 0.7)]["requests"] == 1
    by_task = {t["task"]: t for t in body["tasks"]}
    json_task = by_task["json"]
    assert json_task["current"] == 0.8 and json_task["recommendation"] == 0.4  # 0.45 has 2 answers of the 5 needed
    assert json_task["reason"] == ("json: 0.0% valid at 0.8 over 7 requests, 100.0% valid at 0.4 over 6 requests "
                                   "— set by_task.json to 0.4")
    assert by_task["chat"]["recommendation"] is None and "no JSON answers" in by_task["chat"]["reason"]

    # Below the minimum sample there is no recommendation, and the answer says how far off it is.
    strict = relay.ok("GET", f"/admin/policies/{policy['id']}/insights?min_sample=10")
    json_task = next(t for t in strict["tasks"] if t["task"] == "json")
    assert json_task["recommendation"] is None and json_task["rules"] is None
    assert "7 judged answers at the current 0.8; 10 are needed" in json_task["reason"]

    # The suggested rules are a PATCH away; afterwards a JSON request is sent at 0.4 and parses.
    suggested = by_task["json"]["rules"]
    assert suggested["temperature"] == {"default": 0.7, "by_task": {"json": 0.4}}
    relay.ok("PATCH", f"/admin/policies/{policy['id']}", {"rules": suggested})
    calls.clear()
    answer = _chat(relay, key, model=model, response_format=JSON)
    assert answer.json()["choices"][0]["message"]["content"] == '{"answer": 42}'
    assert calls[-1]["body"]["temperature"] == 0.4


def test_errors_json_retries_and_answers_cut_at_max_tokens_are_counted(relay, upstream):
    prefix, policy, key = _setup(relay, upstream, {"q": "qwen15-like", "r": "json-by-temperature", "c": "capped-20"},
                                 {"temperature": {"default": 0.9, "by_task": {"chat": 0.3}},
                                  "json_retry": {"attempts": 3, "temperature_step": -0.2}})
    for _ in range(3):  # Qwen1.5's inf/nan crash below 0.5
        assert _chat(relay, key, model=f"{prefix}-q").status_code >= 500
    assert _chat(relay, key, model=f"{prefix}-q", temperature=0.6).status_code == 200
    for _ in range(2):  # 0.9 and 0.7 are broken, 0.5 parses: three tries, two of them retries
        answer = _chat(relay, key, model=f"{prefix}-r", response_format=JSON)
        assert answer.headers["x-relay-json-attempts"] == "3"
    assert _chat(relay, key, model=f"{prefix}-c", max_tokens=5).json()["choices"][0]["finish_reason"] == "length"
    assert _chat(relay, key, model=f"{prefix}-c", max_tokens=50).json()["choices"][0]["finish_reason"] == "stop"
    streamed = _chat(relay, key, model=f"{prefix}-c", max_tokens=5, stream=True)
    assert '"finish_reason":"length"' in streamed.text.replace(" ", "")

    body = _insights(relay, policy["id"], 13, "?min_sample=3")
    cells = _cells(body)
    crash = cells[("q", "chat", 0.3)]
    assert (crash["requests"], crash["errors"], crash["error_rate"]) == (3, 3, 1.0)
    assert cells[("q", "chat", 0.6)]["errors"] == 0
    tries = [cells[("r", "json", t)] for t in (0.9, 0.7, 0.5)]
    assert [(c["requests"], c["json_valid"], c["retries"]) for c in tries] == [(2, 0, 4), (2, 0, 0), (2, 2, 0)]
    assert [c["source"] for c in tries] == ["default", "retry", "retry"]
    capped = cells[("c", "chat", 0.3)]
    assert (capped["requests"], capped["finish_length"], capped["length_rate"]) == (3, 2, round(2 / 3, 4))
    chat = next(t for t in body["tasks"] if t["task"] == "chat")
    assert chat["errors"] == ["50.0% of 6 requests at 0.3 failed; POST /admin/channels/{id}/probe finds the "
                              "temperatures a channel refuses"]


def test_what_is_judged_as_json():
    outcome = PolicyOutcome({"temperature": 0.4, "response_format": JSON}, [], "1@1", None, "json")
    seen: list[Observation] = []
    for choice in ({"message": {"content": '{"a": 1}'}, "finish_reason": "stop"},
                   {"text": '{"a": 1}', "finish_reason": "stop"},  # /v1/completions
                   {"message": {"content": '{"a": '}, "finish_reason": "length"},
                   {"message": {"content": None, "tool_calls": [{"id": "c"}]}, "finish_reason": "tool_calls"},
                   {"message": {"content": "[" * 70_000}, "finish_reason": "stop"}):
        note(seen, (outcome, {"choices": [choice]}, None))
    assert [o.pending is not None for o in seen] == [True, True, False, False, False]  # cut, tool call, too long
    assert seen[0].retries == 4 and seen[2].finish_length  # every later try counts as a retry of the first
    note(seen, (outcome, {"choices": []}, False))  # a JSON retry's own verdict is kept
    assert seen[-1].json_valid is False and seen[-1].pending is None
    asyncio.run(judge([{"insight": {"observations": seen}}]))
    assert [o.json_valid for o in seen] == [True, True, None, None, None, False]
    assert all(o.pending is None for o in seen)  # the texts are let go


def test_the_issue_example_and_the_rules_of_evidence():
    rule = TemperatureRule(by_task={"json": 0.4})

    def cells(*seen: tuple[float, int, int]) -> dict[int, Cell]:
        return {bucket({"temperature": t}): Cell(requests=n, json_checked=n, json_valid=v) for t, n, v in seen}

    value, why = recommend("json", rule, cells((0.4, 1200, 1165), (0.3, 800, 797)), 0.99, 200)
    assert value == 0.3
    assert why == "json: 97.1% valid at 0.4 over 1,200 requests, 99.6% valid at 0.3 over 800 requests — set " \
                  "by_task.json to 0.3"
    # The cooler temperature has too few answers to be evidence: nothing to set.
    assert recommend("json", rule, cells((0.4, 1200, 1165), (0.3, 150, 150)), 0.99, 200)[0] is None
    # The current temperature meets the target and nothing warmer has been shown to: keep it.
    value, why = recommend("json", rule, cells((0.4, 500, 499), (0.5, 100, 100)), 0.99, 200)
    assert value is None and why.endswith("keep by_task.json at 0.4")
    # A warmer temperature shown to meet the target on enough answers is recommended.
    assert recommend("json", rule, cells((0.4, 500, 499), (0.6, 300, 300)), 0.99, 200)[0] == 0.6

    adaptive = {"task": "json", "target_validity": 0.99, "min_sample": 200, "step": 0.1}
    rule = TemperatureRule(min=0.25, by_task={"json": 0.4}, adaptive=adaptive)
    assert adaptive_step(rule, cells((0.4, 199, 0))) is None  # one answer short of evidence
    value, evidence = adaptive_step(rule, cells((0.4, 200, 190)))
    assert value == 0.3 and evidence["seen"] == [{"temperature": 0.4, "json_checked": 200, "json_valid": 190}]
    assert adaptive_step(rule.model_copy(update={"by_task": {"json": 0.3}}), cells((0.3, 200, 0)))[0] == 0.25
    assert adaptive_step(rule.model_copy(update={"by_task": {"json": 0.25}}), cells((0.25, 200, 0))) is None
    # Up only on the warmer temperature's own evidence.
    assert adaptive_step(rule, cells((0.4, 200, 200))) is None
    assert adaptive_step(rule, cells((0.4, 200, 200), (0.5, 200, 199)))[0] == 0.5
    assert adaptive_step(rule, cells((0.4, 200, 200), (0.5, 200, 190))) is None
    # greedy_below is a floor too: a default below it would reach the upstream as it is.
    greedy = TemperatureRule(greedy_below=0.35, by_task={"json": 0.4}, adaptive=adaptive)
    assert adaptive_step(greedy, cells((0.4, 200, 0)))[0] == 0.35
    # A default set by hand below that floor is never "stepped down" upwards.
    assert adaptive_step(greedy.model_copy(update={"by_task": {"json": 0.1}}), cells((0.1, 200, 0))) is None
    # Within one 0.05 bucket there is nothing to recommend: the same answers back both.
    assert recommend("json", TemperatureRule(by_task={"json": 0.43}), cells((0.45, 300, 300)), 0.99, 200)[0] is None


def test_bad_adaptive_rules_and_insight_queries_are_400s_and_404s(relay):
    for temperature in ({"adaptive": {"task": "json", "target_validity": 0.99}},  # nowhere to start from
                        {"default": 0.5, "adaptive": {"task": "json", "target_validity": 0}},
                        {"default": 0.5, "adaptive": {"task": "poetry", "target_validity": 0.9}},
                        {"default": 0.5, "adaptive": {"task": "json", "target_validity": 0.9, "step": 0.01}}):
        answer = relay.admin("POST", "/admin/policies", {"model_pattern": "x", "rules": {"temperature": temperature}})
        assert answer.status_code == 400, answer.text
    assert relay.admin("GET", "/admin/policies/999999/insights").status_code == 404
    policy = relay.ok("POST", "/admin/policies", {"model_pattern": f"q-{uuid.uuid4().hex[:6]}", "rules": {}})
    for query in ("days=0", "days=31", "min_sample=0", "target=1.5", "days=x"):
        answer = relay.admin("GET", f"/admin/policies/{policy['id']}/insights?{query}")
        assert answer.status_code == 400 and "error" in answer.json(), (query, answer.text)
    assert relay.admin("GET", f"/admin/policies/{policy['id']}/insights", token=None).status_code == 401
    empty = relay.ok("GET", f"/admin/policies/{policy['id']}/insights")
    assert empty["rows"] == [] and empty["tasks"] == [] and empty["adaptive"] is None


def test_adaptive_temperature_steps_down_one_audited_step_at_a_time_and_stops_at_the_target(tmp_path, upstream):
    """Two gateway processes on one PostgreSQL database both run the adaptive check every 0.3 s: each step is
    taken once, only on `min_sample` judged answers at the current temperature, and it stops where the JSON
    parses (0.5), not stepping back up where it was seen to fail."""
    env = {"RELAY_ADAPTIVE_EVERY_S": "0.3"}
    with postgres_database() as url, run_relay(url, tmp_path, "--workers", "2", env=env) as relay:
        rules = {"temperature": {"min": 0.2, "by_task": {"json": 0.8},
                                 "adaptive": {"task": "json", "target_validity": 0.95, "min_sample": 8}}}
        prefix, policy, key = _setup(relay, upstream, {"j": "json-by-temperature"}, rules)

        def current() -> float:
            return relay.ok("GET", f"/admin/policies/{policy['id']}")["rules"]["temperature"]["by_task"]["json"]

        time.sleep(1.5)
        assert current() == 0.8  # no evidence, no step
        seen = [0.8]
        for _ in range(5):
            before = current()
            for _ in range(8):
                assert _chat(relay, key, model=f"{prefix}-j", response_format=JSON).status_code == 200
            deadline = time.time() + 4
            while current() == before and time.time() < deadline:
                time.sleep(0.1)
            if current() != before:
                seen.append(current())
            time.sleep(1.2)  # both processes reload the stepped policy before the next round
        assert seen == [0.8, 0.7, 0.6, 0.5]
        steps = [e for e in relay.ok("GET", "/admin/audit?entity=policy")["data"]
                 if e["entity_id"] == policy["id"] and e["action"] == "adapt"]
        assert len(steps) == 3 and {e["actor"] for e in steps} == {"relay"}
        evidence = sorted((e["after"]["evidence"] for e in steps), key=lambda e: -e["from"])
        assert [(e["from"], e["to"]) for e in evidence] == [(0.8, 0.7), (0.7, 0.6), (0.6, 0.5)]
        assert all(e["seen"][0]["json_checked"] >= 8 and e["seen"][0]["json_valid"] == 0 for e in evidence)
        # A tenant's own temperature is no evidence the relay acts on: failing answers at the current 0.5, at a
        # temperature the client chose, move nothing.
        never = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object", "required": ["z"]}}}
        for _ in range(16):
            assert _chat(relay, key, model=f"{prefix}-j", response_format=never, temperature=0.5).status_code == 200
        time.sleep(2.0)
        assert current() == 0.5
        body = relay.ok("GET", f"/admin/policies/{policy['id']}/insights")
        assert [s["to"] for s in body["adaptive_steps"]] == [0.5, 0.6, 0.7]
        client = next(r for r in body["rows"] if r["source"] == "client")
        assert (client["temperature"], client["json_checked"], client["json_valid"]) == (0.5, 16, 0)
        json_task = next(t for t in body["tasks"] if t["task"] == "json")
        assert json_task["current"] == 0.5 and json_task["min_sample"] == 8 and json_task["target_validity"] == 0.95


@pytest.mark.parametrize("temperature", [0, 1e-9, 0.024, 0.026, 2, None])
def test_buckets(temperature):
    b = bucket({"temperature": temperature} if temperature is not None else {})
    assert b == {0: 0, 1e-9: 0, 0.024: 0, 0.026: 5, 2: 200, None: -1}[temperature]
