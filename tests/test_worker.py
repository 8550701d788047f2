"""The local worker (backends/) over real HTTP with the openai SDK, on a real tiny Qwen2 model
(random weights from a fixed seed, the real Qwen tokenizer and chat template)."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from backends.loading import load
from backends.server import create_worker_app
from tests.fake_upstream import ServerThread

MODEL = "tiny-qwen2"
ASK = [{"role": "user", "content": "Tell me about the sea."}]


def _chat(tiny_client, **kw):
    return tiny_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=kw.pop("max_tokens", 6), **kw)


GRID = list(itertools.product([0, 1e-40, 1e-5, 0.3, 1, 2], [0, 1e-9, 0.5, 1], [-1, 0, 1, 50]))


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), GRID)
def test_parameter_grid_never_fails(tiny_client, temperature, top_p, top_k):
    """Every value inside the documented ranges answers 200 — including the temperatures that make plain
    transformers raise "probability tensor contains either inf, nan or element < 0"."""
    i = GRID.index((temperature, top_p, top_k))
    penalty = [-2, 0, 2][i % 3]
    kw = {"temperature": temperature, "top_p": top_p, "presence_penalty": penalty, "frequency_penalty": -penalty,
          "extra_body": {"top_k": top_k, "repetition_penalty": [1.0, 1.3][i % 2]}}
    if i % 2:
        kw.update(logprobs=True, top_logprobs=i % 5)
    if i % 4 < 2:
        kw["seed"] = i
    if i % 3 == 0:
        chunks = list(_chat(tiny_client, stream=True, stream_options={"include_usage": True}, **kw))
        assert chunks[-1].usage.completion_tokens >= 1
    else:
        answer = _chat(tiny_client, **kw)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert answer.usage.completion_tokens >= 1


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0), ("presence_penalty", 2.5), ("frequency_penalty", -3), ("top_logprobs", 21),
    ("n", 17), ("max_tokens", 0)])
def test_out_of_range_is_400_naming_the_parameter(tiny_worker, field, value):
    body = {"model": MODEL, "messages": ASK, field: value, "logprobs": True}
    answer = httpx.post(tiny_worker.url + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == field


def test_seed_reproduces_alone_and_in_a_busy_batch(tiny_client, tiny_worker):
    kw = {"temperature": 1.0, "top_p": 0.95, "seed": 1234, "max_tokens": 24}
    alone = _chat(tiny_client, **kw).choices[0].message.content
    assert _chat(tiny_client, **kw).choices[0].message.content == alone
    with ThreadPoolExecutor(9) as pool:
        noise = [pool.submit(_chat, tiny_client, temperature=1.0, seed=s, max_tokens=40) for s in range(8)]
        time.sleep(0.05)  # let the others start decoding first
        busy = pool.submit(_chat, tiny_client, **kw).result().choices[0].message.content
        others = [f.result().choices[0].message.content for f in noise]
    assert busy == alone
    assert len(set(others)) > 1  # different seeds really sample differently
    unseeded = {_chat(tiny_client, temperature=1.0, max_tokens=24).choices[0].message.content for _ in range(3)}
    assert len(unseeded) > 1


def test_greedy_is_the_same_alone_and_batched(tiny_client):
    prompts = [f"Question number {i}: what is {i} plus {i}?" for i in range(6)]

    def greedy(p: str) -> str:
        return tiny_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                              temperature=0, max_tokens=20).choices[0].message.content

    alone = [greedy(p) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        batched = list(pool.map(greedy, prompts))
    assert batched == alone


def _teacher_forced(tiny_lm, prompt_ids: list[int], generated: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logits = tiny_lm.model(ids).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1)  # [len(generated), V]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_equal_a_teacher_forced_forward(tiny_client, tiny_lm, stream):
    kw = {"temperature": 0.8, "seed": 3, "max_tokens": 16, "logprobs": True, "top_logprobs": 5,
          "extra_body": {"return_tokens_as_token_ids": True}}
    with ThreadPoolExecutor(4) as pool:  # computed inside a batch with other requests
        noise = [pool.submit(_chat, tiny_client, temperature=1.0, max_tokens=30) for _ in range(3)]
        if stream:
            entries = [e for c in _chat(tiny_client, stream=True, **kw) if c.choices and c.choices[0].logprobs
                       for e in c.choices[0].logprobs.content]
        else:
            entries = _chat(tiny_client, **kw).choices[0].logprobs.content
        [f.result() for f in noise]
    generated = [int(e.token.removeprefix("token_id:")) for e in entries]
    prompt_ids = list(tiny_lm.tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))
    reference = _teacher_forced(tiny_lm, prompt_ids, generated)
    for step, entry in enumerate(entries):
        assert abs(entry.logprob - float(reference[step, generated[step]])) < 1e-4
        top = torch.topk(reference[step], 5).values.tolist()
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=1e-4)


def test_completions_logprobs_and_usage(tiny_client, tiny_lm):
    answer = tiny_client.completions.create(model=MODEL, prompt="The sea is", max_tokens=5, temperature=0, logprobs=2)
    prompt_len = len(tiny_lm.tokenizer.encode("The sea is"))
    assert answer.usage.prompt_tokens == prompt_len
    assert answer.usage.completion_tokens == len(answer.choices[0].logprobs.token_logprobs) == 5
    assert all(len(t) == 2 for t in answer.choices[0].logprobs.top_logprobs)
    assert answer.choices[0].finish_reason == "length"


def test_stop_strings_n_and_finish_reasons(tiny_client):
    long = _chat(tiny_client, temperature=0, max_tokens=30).choices[0].message.content
    assert len(long) > 6
    stop = long[3:6]
    cut = _chat(tiny_client, temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == long[:long.find(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _chat(tiny_client, temperature=0, max_tokens=30, stop=[stop], stream=True) if c.choices)
    assert streamed == long[:long.find(stop)]
    three = _chat(tiny_client, temperature=1.0, seed=5, n=3, max_tokens=8)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.usage.completion_tokens == 24


def test_stream_chunks_follow_openai(tiny_worker):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", tiny_worker.url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def _active(tiny_worker) -> int:
    return httpx.get(tiny_worker.url + "/health", timeout=10).json()["active"]


def test_client_disconnect_cancels_generation(tiny_client, tiny_worker):
    stream = _chat(tiny_client, max_tokens=3000, temperature=1.0, stream=True)
    next(iter(stream))
    next(iter(stream))
    assert _active(tiny_worker) >= 1
    stream.close()
    deadline = time.time() + 10
    while _active(tiny_worker) and time.time() < deadline:
        time.sleep(0.05)
    assert _active(tiny_worker) == 0


def test_short_requests_overtake_a_long_one(tiny_client):
    """Continuous batching: a short request that arrives while a long one decodes finishes first."""
    finished: dict[str, float] = {}

    def run(name: str, n: int) -> None:
        _chat(tiny_client, max_tokens=n, temperature=1.0, seed=1)
        finished[name] = time.time()

    long = threading.Thread(target=run, args=("long", 400))
    long.start()
    time.sleep(0.3)
    run("short", 3)
    assert "long" not in finished  # the short one did not wait for the long one to end
    long.join()


def test_nan_logits_are_sanitised(tiny_lm):
    """A model whose logits hold NaN and inf still answers, and the worker counts what it repaired."""
    broken = load(MODEL)

    with torch.no_grad():  # output rows of NaN and inf: those tokens' logits are NaN / inf (or NaN, inf - inf)
        weight = broken.model.get_output_embeddings().weight
        weight[::7] = float("nan")
        weight[1::11] = float("inf")
    with ServerThread(create_worker_app(broken)) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for temperature in (0, 1e-40, 0.7, 2):
            answer = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=temperature,
                                               logprobs=True, top_logprobs=3)
            assert answer.choices[0].finish_reason in ("stop", "length")
            assert all(e.logprob > float("-inf") for e in answer.choices[0].logprobs.content)
        assert httpx.get(server.url + "/health").json()["nonfinite_logit_rows"] > 0


def test_unknown_model_is_404(tiny_worker):
    answer = httpx.post(tiny_worker.url + "/v1/chat/completions", json={"model": "nope", "messages": ASK}, timeout=30)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body", [
    {"seed": 2**64 - 1, "n": 2}, {"seed": -(2**63)}, {"stop": ""}, {"stop": ["", "zz"]},
    {"repetition_penalty": 1e-40, "temperature": 1}, {"repetition_penalty": 10, "frequency_penalty": -2},
    {"logit_bias": {"0": 100, "1": -100}}, {"min_p": 1, "top_k": 1, "temperature": 2},
])
def test_edge_values_answer_and_never_poison_the_batch(tiny_worker, body):
    """Odd but valid values answer 200 while another request decodes in the same batch, which also answers."""
    with ThreadPoolExecutor(2) as pool:
        neighbour = pool.submit(httpx.post, tiny_worker.url + "/v1/chat/completions", timeout=60,
                                json={"model": MODEL, "messages": ASK, "max_tokens": 40})
        time.sleep(0.05)
        answer = httpx.post(tiny_worker.url + "/v1/chat/completions", timeout=60,
                            json={"model": MODEL, "messages": ASK, "max_tokens": 8, **body})
        assert answer.status_code == 200, answer.text
        assert neighbour.result().status_code == 200


def test_logit_bias_steers_greedy_decoding(tiny_client):
    answer = _chat(tiny_client, temperature=0, max_tokens=4, logit_bias={"9707": 100})
    assert answer.choices[0].message.content == "Hello" * 4


def test_non_streamed_disconnect_cancels_generation(tiny_worker):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_worker.url + "/v1/chat/completions", timeout=1.0,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 3000})
    deadline = time.time() + 10
    while _active(tiny_worker) and time.time() < deadline:
        time.sleep(0.05)
    assert _active(tiny_worker) == 0


def test_max_batch_is_enforced(tiny_lm):
    import asyncio

    from backends.engine import DoneEvent, Engine, GenRequest
    from backends.sampler import SamplingParams

    engine = Engine(tiny_lm, max_batch=2)
    engine.start()
    prompt = list(tiny_lm.tokenizer.encode("hello there"))
    peak = 0

    async def run() -> None:
        nonlocal peak
        queues = [engine.submit(GenRequest(prompt, SamplingParams(), max_tokens=20)) for _ in range(6)]
        for q in queues:
            while not isinstance(await q.get(), DoneEvent):
                peak = max(peak, engine.active)

    try:
        asyncio.run(run())
    finally:
        engine.stop()
    assert 1 <= peak <= 2
