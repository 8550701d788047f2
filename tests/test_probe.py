"""The parameter probe (POST /admin/channels/{id}/probe) against fake upstreams that misbehave the way real ones
do: Qwen1.5's sampler crashing below temperature 0.5, and a server that refuses `top_k`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import openai
import pytest

from admin.probe import MAX_REQUESTS, Outcome, classify, propose
from tests.conftest import ROOT, SECRET_KEY, add_fake_channel


def _by_check(result: dict) -> dict[str, str]:
    return {o["check"]: o["result"] for o in result["outcomes"]}


def test_probe_finds_the_qwen15_floor_and_greedy_by_top_k_then_apply_makes_temperature_zero_work(relay, upstream,
                                                                                                   calls):
    model = f"q15-{time.monotonic_ns()}"
    channel = add_fake_channel(relay, upstream[1], f"probe-{model}", [model],
                               model_mapping={model: "qwen15-like"})
    key = relay.new_key()
    time.sleep(1)
    client = relay.client(key["key"])
    # Without a policy the classic crash reaches the client.
    with pytest.raises(openai.APIStatusError) as crashed:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert crashed.value.status_code >= 500

    calls.clear()
    result = relay.ok("POST", f"/admin/channels/{channel['id']}/probe?apply=true")
    assert len(calls) == result["requests"] <= MAX_REQUESTS
    assert all(c["body"]["model"] == "qwen15-like" for c in calls)  # straight to the channel, no policy between
    table = _by_check(result)
    assert table["temperature=0.3"] == "crash" and table["temperature=0"] == "crash"
    assert table["temperature=0.7"] == "ok"
    assert table["top_k=1"] == "ok"
    floor = result["temperature_floor"]
    assert 0.5 <= floor <= 0.55, floor  # the true edge is 0.5: found within 0.05
    rules = result["rules"]
    assert rules["greedy_as"] == "top_k_one" and rules["temperature"]["min"] == floor
    assert rules["temperature"]["greedy_below"] == 0.01
    # explain: temperature 0 becomes a safe temperature plus top_k=1
    final = result["explain"]["final"]
    assert final["top_k"] == 1 and final["temperature"] >= 0.5
    # stored on the channel and shown by GET
    shown = relay.ok("GET", f"/admin/channels/{channel['id']}")
    assert shown["probe"]["temperature_floor"] == floor and shown["probed_at"]
    assert result["applied"] and result["applied"][0]["model_pattern"] == model
    audit = relay.ok("GET", "/admin/audit?entity=policy")
    assert any(e["entity_id"] == result["applied"][0]["id"] for e in audit["data"])

    time.sleep(1)  # the catalog poll
    answer = client.chat.completions.with_raw_response.create(model=model, temperature=0,
                                                              messages=[{"role": "user", "content": "hi"}])
    assert answer.http_response.status_code == 200
    assert "top_k:" in answer.headers["x-relay-rewrites"]


def test_probe_proposes_dropping_a_refused_top_k(relay, upstream):
    model = f"ntk-{time.monotonic_ns()}"
    channel = add_fake_channel(relay, upstream[1], f"probe-{model}", [model], model_mapping={model: "no-top-k"})
    result = relay.ok("POST", f"/admin/channels/{channel['id']}/probe")
    table = _by_check(result)
    assert table["top_k=1"] == "rejected" and table["temperature=0"] == "ok"
    assert result["temperature_floor"] is None
    assert result["rules"]["drop"] == ["top_k"] and result["rules"]["greedy_as"] == "temperature_zero"
    assert "applied" not in result
    assert relay.ok("GET", f"/admin/channels/{channel['id']}")["probe"]["rules"]["drop"] == ["top_k"]


def test_probe_refuses_a_model_the_channel_does_not_serve_and_reports_an_unreachable_channel(relay, upstream):
    channel = add_fake_channel(relay, upstream[1], f"probe-down-{time.monotonic_ns()}", ["down-m"],
                               model_mapping={"down-m": "fail-503"})
    wrong = relay.admin("POST", f"/admin/channels/{channel['id']}/probe?model=other")
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    result = relay.ok("POST", f"/admin/channels/{channel['id']}/probe")
    assert "error" in result and "rules" not in result and result["requests"] == 1
    refused = relay.admin("POST", f"/admin/channels/{channel['id']}/probe?apply=true")
    assert refused.status_code == 400
    assert relay.admin("POST", "/admin/channels/999999/probe").status_code == 404
    assert relay.admin("POST", f"/admin/channels/{channel['id']}/probe", token=None).status_code == 401


def test_classification_and_proposal_rules():
    assert classify(500, "RuntimeError: probability tensor contains either `inf`, `nan` or element < 0") == "crash"
    assert classify(400, "temperature must be positive") == "must_be_positive"
    assert classify(400, "Unrecognized request argument supplied: top_k") == "rejected"
    assert classify(502, "bad gateway") == "error"
    # temperature 0 fails, top_k too: clamp to the coolest temperature that worked, no greedy rewrite
    outcomes = [Outcome("temperature=0", {"temperature": 0}, "must_be_positive"),
                Outcome("temperature=1e-05", {"temperature": 1e-5}, "ok"),
                Outcome("top_k=1", {"top_k": 1}, "rejected"), Outcome("top_p=0", {"top_p": 0}, "error"),
                Outcome("top_p=1e-9", {"top_p": 1e-9}, "ok")]
    rules, capabilities = propose(outcomes, None)
    assert rules["temperature"] == {"min": 1e-5} and rules["drop"] == ["top_k"] and rules["top_p"] == {"min": 0.01}
    assert capabilities == {"seeded_determinism": False, "stream_usage": False}
    # A busy upstream decides nothing: no temperature rule from an undecided sweep, and no floor from a 429.
    busy = [Outcome("temperature=0.05", {"temperature": 0.05}, "unavailable"),
            Outcome("temperature=0", {"temperature": 0}, "ok")]
    assert "temperature" not in propose(busy, None)[0] and "greedy_as" not in propose(busy, None)[0]
    assert classify(400, "temperature must be > 0.1") == "rejected"  # "> 0.1" is not "must be positive"
    assert classify(500, "sampling produced NaN or Inf values") == "crash"
    # Seeds: three equal answers and a different control answer, or nothing is claimed.
    seeds = [Outcome(f"seed=1234 ({i})", {"seed": 1234}, "ok", text="417") for i in (1, 2, 3)]
    assert propose([*seeds, Outcome("seed=98765 (control)", {"seed": 98765}, "ok", text="88")], None)[1][
        "seeded_determinism"]
    assert not propose([*seeds, Outcome("seed=98765 (control)", {"seed": 98765}, "ok", text="417")], None)[1][
        "seeded_determinism"]


def test_cli_probe_applies_the_same_proposal(relay, upstream):
    model = f"cli-q15-{time.monotonic_ns()}"
    channel = add_fake_channel(relay, upstream[1], f"probe-{model}", [model], model_mapping={model: "qwen15-like"})
    env = {**os.environ, "RELAY_DATABASE_URL": relay.database_url, "RELAY_SECRET_KEY": SECRET_KEY}
    done = subprocess.run([sys.executable, "-m", "admin.cli", "channel", "probe", channel["name"], "--apply"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rules"]["greedy_as"] == "top_k_one" and 0.5 <= result["temperature_floor"] <= 0.55
    assert result["applied"][0]["model_pattern"] == model
    policies = relay.ok("GET", "/admin/policies")
    assert any(p["model_pattern"] == model and p["rules"]["greedy_as"] == "top_k_one" for p in policies)
    missing = subprocess.run([sys.executable, "-m", "admin.cli", "channel", "probe", "no-such-channel"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "No channel is named" in missing.stderr


def test_apply_reaches_only_the_models_that_were_asked_and_keeps_their_other_rules(relay, upstream):
    crashy, other = f"q15m-{time.monotonic_ns()}", f"plain-{time.monotonic_ns()}"
    channel = add_fake_channel(relay, upstream[1], f"probe-two-{crashy}", [other, crashy],
                               model_mapping={crashy: "qwen15-like"})
    kept = relay.ok("POST", "/admin/policies", {"model_pattern": crashy, "enabled": False,
                                                "rules": {"temperature": {"max": 1.5}, "max_tokens": {"max": 99}}})
    result = relay.ok("POST", f"/admin/channels/{channel['id']}/probe?model={crashy}&apply=true")
    assert result["complete"] and result["models"] == [crashy]
    assert [p["model_pattern"] for p in result["applied"]] == [crashy] and result["applied"][0]["id"] == kept["id"]
    policy = relay.ok("GET", f"/admin/policies/{kept['id']}")
    assert policy["enabled"] and policy["rules"]["max_tokens"] == {"max": 99}
    assert policy["rules"]["temperature"]["max"] == 1.5 and policy["rules"]["temperature"]["min"] == 0.5
    assert not any(p["model_pattern"] == other for p in relay.ok("GET", "/admin/policies"))
