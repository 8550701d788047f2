"""/v1/embeddings through the real relay (PostgreSQL, Redis) with the official openai SDK: inputs of every shape,
both encodings, dimensions, the cache, the bill, policies, litellm channels and the endpoint's errors."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest
import redis

from backends.embedder import load_embedder
from backends.embedding_server import create_embedding_app
from tests.conftest import add_fake_channel, postgres_database, run_relay
from tests.fake_upstream import ServerThread, fake_vector

REDIS_DB_URL = "redis://127.0.0.1:6379/11"


@pytest.fixture(scope="module")
def relay(tmp_path_factory, upstream):
    redis.Redis.from_url(REDIS_DB_URL).flushdb()
    tmp = tmp_path_factory.mktemp("embeddings")
    worker_app = create_embedding_app(load_embedder("all-minilm-l6-v2"))
    with postgres_database() as url, ServerThread(worker_app) as worker, \
            run_relay(url, tmp, env={"RELAY_REDIS_URL": REDIS_DB_URL}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["embed-x", "fail-503"], model_mapping={"embed-x": "up-embed"})
        relay.ok("POST", "/admin/channels", {"name": "local", "type": "local", "base_url": worker.url,
                                             "models": ["all-minilm-l6-v2"]})
        relay.worker_url = worker.url  # type: ignore[attr-defined]
        relay.ok("POST", "/admin/channels", {
            "name": "via-litellm", "type": "litellm", "models": ["lt-embed"], "base_url": upstream[1] + "/v1",
            "api_key": "upstream-secret", "options": {"model": "openai/lt-upstream-embed"}})
        yield relay


def _close(got: list[float], want: list[float]) -> bool:
    return len(got) == len(want) and all(abs(a - b) < 1e-6 for a, b in zip(got, want, strict=True))


def test_text_list_and_token_inputs_in_both_encodings(relay, calls):
    client = relay.client(relay.new_key()["key"])
    text = f"hello {uuid.uuid4().hex}"
    default = client.embeddings.create(model="embed-x", input=text)  # the SDK asks for base64 and unpacks it
    assert _close(default.data[0].embedding, fake_vector(text))
    assert default.model == "embed-x" and default.usage.prompt_tokens == 2
    upstream = calls[-1]
    assert upstream["path"] == "/v1/embeddings" and upstream["body"]["model"] == "up-embed"
    assert upstream["body"]["encoding_format"] == "float"  # the relay encodes for the client

    texts = [f"first {uuid.uuid4().hex}", "second one here"]
    floats = client.embeddings.create(model="embed-x", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert all(_close(d.embedding, fake_vector(t)) for d, t in zip(floats.data, texts, strict=True))

    ids = [[101, 2023, 7], [5, 6]]
    by_ids = client.embeddings.create(model="embed-x", input=ids, dimensions=4)
    assert all(_close(d.embedding, fake_vector(i, 4)) for d, i in zip(by_ids.data, ids, strict=True))
    assert calls[-1]["body"]["dimensions"] == 4 and by_ids.usage.prompt_tokens == 5
    single = client.embeddings.create(model="embed-x", input=[7, 8, 9], encoding_format="float")
    assert _close(single.data[0].embedding, fake_vector([7, 8, 9]))


def test_embeddings_are_cached_billed_and_logged(relay, calls):
    key = relay.new_key(tenant={"token_quota": 1000})
    client = relay.client(key["key"])
    text = f"cache me {uuid.uuid4().hex}"
    first = client.embeddings.with_raw_response.create(model="embed-x", input=text, encoding_format="float")
    second = client.embeddings.with_raw_response.create(model="embed-x", input=text)  # base64: same cache entry
    assert first.headers["x-relay-cache"] == "miss" and second.headers["x-relay-cache"] == "hit"
    assert len([c for c in calls if c["path"].endswith("/embeddings")]) == 1
    assert _close(second.parse().data[0].embedding, first.parse().data[0].embedding)
    assert second.parse().usage.prompt_tokens == first.parse().usage.prompt_tokens == 3
    no_store = client.embeddings.with_raw_response.create(model="embed-x", input=text,
                                                           extra_headers={"Cache-Control": "no-cache"})
    assert no_store.headers["x-relay-cache"] == "miss"
    rows = relay.logs(key["tenant_id"], want=3)
    assert {r["endpoint"] for r in rows} == {"embeddings"}
    assert sorted(r["cache"] for r in rows) == ["hit", "miss", "miss"]
    assert all(r["prompt_tokens"] == 3 and r["completion_tokens"] == 0 for r in rows)
    deadline = time.time() + 10  # settled in the background; no output tokens were reserved or spent
    while relay.ok("GET", f"/admin/tenants/{key['tenant_id']}")["used_tokens"] != 9 and time.time() < deadline:
        time.sleep(0.2)
    assert relay.ok("GET", f"/admin/tenants/{key['tenant_id']}")["used_tokens"] == 9


def test_policies_do_not_add_sampling_parameters(relay, calls):
    relay.ok("POST", "/admin/policies", {"model_pattern": "embed-x", "rules": {
        "temperature": {"min": 0.5, "default": 0.7}, "max_tokens": {"max": 100}, "seed": {"default": 1}}})
    client = relay.client(relay.new_key()["key"])
    answer = client.embeddings.with_raw_response.create(model="embed-x", input=f"p {uuid.uuid4().hex}")
    assert answer.headers["x-relay-rewrites"] == "none" and answer.headers["x-relay-policy"] != "none"
    assert set(calls[-1]["body"]) == {"model", "input", "encoding_format"}


def test_litellm_channels_embed_through_litellm(relay, calls):
    client = relay.client(relay.new_key()["key"])
    answer = client.embeddings.create(model="lt-embed", input=["one", "two"], encoding_format="float")
    assert calls[-1]["body"]["model"] == "lt-upstream-embed"
    assert set(calls[-1]["body"]) <= {"model", "input", "encoding_format", "dimensions"}  # nothing of litellm's
    assert [len(d.embedding) for d in answer.data] == [8, 8] and _close(answer.data[1].embedding, fake_vector("two"))


def test_the_local_embedding_worker_through_the_relay(relay):
    texts = ["policy-relay keeps sampling safe", "温度为零时使用贪心解码", "a third, longer sentence " * 20]
    client = relay.client(relay.new_key()["key"])
    via_relay = client.embeddings.create(model="all-minilm-l6-v2", input=texts)
    direct = openai.OpenAI(base_url=relay.worker_url + "/v1", api_key="unused").embeddings.create(
        model="all-minilm-l6-v2", input=texts, encoding_format="float")
    for mine, theirs in zip(via_relay.data, direct.data, strict=True):
        assert len(mine.embedding) == 384 and _close(mine.embedding, theirs.embedding)
    assert via_relay.usage.prompt_tokens == direct.usage.prompt_tokens > 0
    short = client.embeddings.create(model="all-minilm-l6-v2", input="short", dimensions=32)
    assert len(short.data[0].embedding) == 32
    local = next(c for c in relay.ok("GET", "/admin/channels") if c["name"] == "local")
    tested = relay.ok("POST", f"/admin/channels/{local['id']}/test")  # chat refused: tried as an embedding model
    assert tested["last_test_ok"] is True and tested["last_test_error"] is None


def test_bad_embedding_requests_are_clear_4xx(relay, calls):
    key = relay.new_key(models=["embed-x", "fail-503"])
    client = relay.client(key["key"])
    for body, param in (({"input": ""}, "input"), ({"input": []}, "input"), ({"input": ["a", 3]}, "input"),
                        ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
                        ({"input": "a", "stream": True}, "stream"), ({"input": "a", "dimensions": 0}, "dimensions"),
                        ({}, "input"), ({"input": ["x"] * 2049}, "input"), ({"input": [-1]}, "input")):
        answer = httpx.post(relay.url + "/v1/embeddings", headers={"Authorization": f"Bearer {key['key']}"},
                            json={"model": "embed-x", **body}, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (body, answer.text)
    assert not calls  # none of them reached the upstream
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="lt-embed", input="not allowed for this key")
    with pytest.raises(openai.NotFoundError):
        relay.client(relay.new_key()["key"]).embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="fail-503", input="upstream down")
