"""The worker's bounded waiting queue (backends.admission, `--max-waiting`): a real `python -m backends` process with
`--max-batch 1 --max-waiting 1` holds two sequences; beyond them a request (chat or completions, streamed or not)
is refused at once with an OpenAI-shaped 503 `overloaded`, Retry-After and retry-after-ms; the refusals are
counted in /metrics; answers carry their queue time (Server-Timing); places are given back however a request
ends. Plus the Retry-After arithmetic as unit tests."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.admission import (
    FALLBACK_RETRY_S,
    Admission,
    TokenRate,
    queue_timing,
    retry_after_s,
    retry_headers,
    sequences,
)
from backends.wire.errors import APIError
from tests.conftest import run_worker
from tests.net import wait_until

MODEL = "tiny-qwen2"
ASK = [{"role": "user", "content": "Tell me about the sea."}]
HELLO = {"9707": 100}  # always "Hello": never an end-of-turn token, so max_tokens sets the length
LONG = {"model": MODEL, "messages": ASK, "max_tokens": 60, "logit_bias": HELLO}  # about a second on a small CPU
QUEUE = re.compile(r"^queue;dur=(\d+\.\d)$")


def agree(whole: int, ms: int) -> bool:
    """Retry-After is retry-after-ms rounded up to whole seconds (both from one float)."""
    return whole - 1.001 < ms / 1000 <= whole + 0.001


# --- the estimator's arithmetic (no worker) --------------------------------------------------------------------

def test_retry_after_is_the_time_for_the_excess_to_finish():
    assert retry_after_s(3, 100, 50) == pytest.approx(6.0)  # 3 sequences × 100 tokens at 50 tokens/s
    assert retry_after_s(1, 20, 400) == 1.0  # 0.05 s: at least a second
    assert retry_after_s(10, 500, 10) == 60.0  # 500 s: at most a minute
    assert retry_after_s(2, 100, None) == retry_after_s(2, 100, 0.0) == FALLBACK_RETRY_S


def test_retry_headers_round_up_and_stay_within_a_minute():
    for seconds in (1.0, 2.2, 59.5, 60.0):
        headers = retry_headers(seconds)
        whole, ms = int(headers["Retry-After"]), int(headers["retry-after-ms"])
        assert 1 <= whole <= 60 and seconds * 1000 - 1 <= ms <= min(60_000, seconds * 1250 + 1)
        assert agree(whole, ms)


def test_token_rate_counts_the_recent_window_only():
    rate = TokenRate(window_s=5.0)
    assert rate.per_second(now=100.0) is None
    rate.add(10, now=100.1)
    rate.add(10, now=100.7)
    rate.add(20, now=101.2)
    assert rate.per_second(now=102.0) == pytest.approx(40 / 2.0)  # since the oldest bucket's second (100)
    assert rate.per_second(now=100.5) == pytest.approx(40 / 1.0)  # never over less than a second
    assert rate.per_second(now=106.5) == pytest.approx(20 / 5.5)  # the second 100 has left the window
    assert rate.per_second(now=107.1) is None


def test_admission_counts_places_until_each_sequence_ends():
    refused = []
    admission = Admission(max_batch=2, max_waiting=1, rate=TokenRate(), on_refused=lambda: refused.append(1))
    big = admission.admit(5)  # an idle worker takes any one request
    with pytest.raises(APIError) as caught:
        admission.admit(1)
    error = caught.value
    assert (error.status, error.type, error.code, error.param) == (503, "server_error", "overloaded", None)
    assert "Retry-After" in error.headers and "retry-after-ms" in error.headers
    big.close()
    first, second = admission.admit(2), admission.admit(1)  # 3 places: 2 in the batch, 1 waiting
    with pytest.raises(APIError):
        admission.admit(1)
    assert admission.admitted == 3 and len(refused) == 2
    first.done(40)  # one of its two sequences finished: one place back
    third = admission.admit(1)
    first.close()  # gives back only what it still holds
    second.done(20)
    second.done(20)  # it held one place: nothing more comes back, nothing is counted twice
    second.close()
    assert admission.admitted == 1
    third.close()
    assert admission.admitted == 0
    assert admission.tokens_per_sequence == pytest.approx(40 + 0.1 * (20 - 40))


def test_the_refusal_estimates_from_the_measured_rate():
    rate = TokenRate()
    now = time.perf_counter()
    for i in range(5):
        rate.add(100, now=now - 4 + i)  # 500 tokens over the last ~4-5 s
    admission = Admission(max_batch=1, max_waiting=0, rate=rate)
    admission.admit(1).done(300)  # a finished sequence: 300 tokens is the mean now
    admission.admit(1)
    with pytest.raises(APIError) as caught:
        admission.admit(3)  # three more must finish first: 3 × 300 tokens at 100-125 tokens/s
    assert 7.2 <= int(caught.value.headers["retry-after-ms"]) / 1000 <= 9 * 1.25 + 0.01


def test_sequences_are_prompts_times_n():
    assert sequences({"messages": ASK}) == 1
    assert sequences({"messages": ASK, "n": 3}) == 3
    assert sequences({"prompt": "hi", "n": 2}) == 2
    assert sequences({"prompt": [1, 2, 3]}) == 1
    assert sequences({"prompt": ["a", "b", "c"], "n": 2}) == 6
    assert sequences({"prompt": [[1], [2]]}) == 2


def test_queue_timing_is_the_longest_started_wait():
    reqs = [SimpleNamespace(timing=SimpleNamespace(submitted=1.0, started=1.25)),
            SimpleNamespace(timing=SimpleNamespace(submitted=1.0, started=1.5)),
            SimpleNamespace(timing=SimpleNamespace(submitted=1.0, started=0.0)),  # not started
            SimpleNamespace(timing=None)]
    assert queue_timing(reqs) == {"Server-Timing": "queue;dur=500.0"}
    assert queue_timing(reqs[2:]) == {}


# --- a real worker process -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with run_worker(tmp_path_factory.mktemp("overload"), MODEL, "--max-batch", "1", "--max-waiting", "1") as url:
        yield url


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name + (f"[{s.labels['reason']}]" if "reason" in s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def burst(url: str, bodies: list[tuple[str, dict]]) -> list[tuple[httpx.Response, float]]:
    """All at once; each answer with its time from the burst's start."""
    async def run() -> list[tuple[httpx.Response, float]]:
        start = time.perf_counter()
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            async def one(path: str, body: dict) -> tuple[httpx.Response, float]:
                answer = await client.post(path, json=body)
                return answer, time.perf_counter() - start
            return await asyncio.gather(*(one(path, body) for path, body in bodies))
    return asyncio.run(run())


def assert_overloaded(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "overloaded" and error["param"] is None
    assert "--max-waiting 1" in error["message"]
    whole, ms = int(answer.headers["Retry-After"]), int(answer.headers["retry-after-ms"])
    assert 1 <= whole <= 60 and 1 <= ms <= 60_000 and agree(whole, ms)


def queue_ms(answer: httpx.Response) -> float:
    match = QUEUE.match(answer.headers.get("server-timing", ""))
    assert match, answer.headers
    return float(match.group(1))


def when_full(url: str) -> None:
    """Until one sequence runs and one waits (the two LONG ones started in the background)."""
    wait_until(lambda: (found := metrics(url))["worker_num_requests_running"] == 1
               and found["worker_num_requests_waiting"] == 1, timeout=20, what="a full worker")


def test_a_burst_beyond_the_batch_and_the_queue_is_refused(worker):
    before = metrics(worker)
    assert before["worker_num_requests_waiting_limit"] == 1
    answers = burst(worker, [("/v1/chat/completions", LONG)] * 12)
    ok = [(a, t) for a, t in answers if a.status_code == 200]
    refused = [a for a, _ in answers if a.status_code != 200]
    assert len(ok) == 2 and len(refused) == 10, [a.status_code for a, _ in answers]
    for answer in refused:
        assert_overloaded(answer)
    assert max(t for _, t in answers if _.status_code == 503) < min(t for _, t in ok)  # refused at once
    # With one row, the second admitted waited in the queue for about the whole of the first.
    first = min(t for _, t in ok)
    assert max(queue_ms(a) for a, _ in ok) >= 0.5 * first * 1000
    after = metrics(worker)
    assert after["worker_requests_rejected_total[overloaded]"] - before["worker_requests_rejected_total[overloaded]"] \
        == 10
    again = httpx.post(worker + "/v1/chat/completions", json={**LONG, "max_tokens": 2}, timeout=60)
    assert again.status_code == 200, again.text
    assert queue_ms(again) < first * 1000  # nobody ahead now


@contextlib.contextmanager
def busy(url: str, *bodies: dict) -> Iterator[None]:
    """These chat requests run meanwhile (started in this order); each must answer 200."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        running = []
        for body in bodies:
            running.append(pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60))
            time.sleep(0.2)
        yield
        assert [future.result().status_code for future in running] == [200] * len(bodies)


def test_streams_and_completions_are_refused_before_any_stream_starts(worker):
    long = {**LONG, "max_tokens": 150}
    with busy(worker, long, long):
        when_full(worker)
        before = metrics(worker)["worker_requests_rejected_total[overloaded]"]
        for path, body in [("/v1/chat/completions", {**LONG, "stream": True}),
                           ("/v1/completions", {"model": MODEL, "prompt": "The sea", "max_tokens": 5, "stream": True}),
                           ("/v1/completions", {"model": MODEL, "prompt": "The sea", "max_tokens": 5})]:
            with httpx.stream("POST", worker + path, json=body, timeout=30) as answer:
                answer.read()
                assert_overloaded(answer)
        client = openai.OpenAI(base_url=worker + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, stream=True)
        assert caught.value.status_code == 503 and caught.value.code == "overloaded"
        assert metrics(worker)["worker_requests_rejected_total[overloaded]"] - before == 4
    with httpx.stream("POST", worker + "/v1/chat/completions", json={**LONG, "max_tokens": 3, "stream": True},
                      timeout=30) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        queue_ms(answer)
        lines = [line for line in answer.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and len(lines) == 1 + 3 + 1 + 1  # role, 3 tokens, finish, [DONE]


def test_an_idle_worker_takes_a_request_larger_than_its_places(worker):
    answer = httpx.post(worker + "/v1/chat/completions", json={**LONG, "max_tokens": 2, "n": 3}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"]) == 3


def test_places_are_given_back_however_a_request_ends(worker):
    with busy(worker, {**LONG, "max_tokens": 100}):
        wait_until(lambda: metrics(worker)["worker_num_requests_running"] == 1, timeout=20, what="a running one")
        # Admitted, then failed: token ids outside the vocabulary are found only when the prompt is read.
        bad = httpx.post(worker + "/v1/completions", json={"model": MODEL, "prompt": [10**9], "max_tokens": 2},
                         timeout=30)
        assert bad.status_code == 400, bad.text
        # Admitted, then gone while waiting: a stream (its response not started yet) and a plain request.
        for stream in (True, False):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(worker + "/v1/chat/completions", json={**LONG, "stream": stream}, timeout=0.5)
            # The worker notices within a second: its sequence leaves the engine's queue, its place comes back.
            wait_until(lambda: metrics(worker)["worker_num_requests_waiting"] == 0, timeout=10, what="the cancel")
    wait_until(lambda: (found := metrics(worker))["worker_num_requests_running"] == 0
               and found["worker_num_requests_waiting"] == 0, timeout=20, what="an idle worker")
    # Both places are free again: exactly two of three are admitted.
    answers = burst(worker, [("/v1/chat/completions", {**LONG, "max_tokens": 20})] * 3)
    assert sorted(a.status_code for a, _ in answers) == [200, 200, 503]
