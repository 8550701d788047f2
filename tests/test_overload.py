"""Overload, end to end: real `serve` processes with small in-flight limits in front of the fake upstream (its
`slow-<ms>` models hold a slot as long as asked, and note a client that left; `busy-<s>` answers 503 overloaded).
Refusals come before the body is read, waiting requests are served in order and fairly, health checks and the
admin API never wait, clients that leave are not served, and channels' max_inflight sheds or fails over."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import Relay, add_fake_channel, database, run_relay, run_worker

SLOW = [f"slow-{ms}" for ms in (200, 300, 600, 900, 1500, 2000, 2500, 4000)] + ["slow-301", "slow-302", "slow-303"]


@contextlib.contextmanager
def _relay(upstream, tmp_path_factory, name: str, **env: str) -> Iterator[Relay]:
    tmp = tmp_path_factory.mktemp(name)
    with database("sqlite", tmp) as url, run_relay(url, tmp, env=env) as relay:
        add_fake_channel(relay, upstream[1], "fake", [*SLOW, "plain-model"])
        yield relay


@pytest.fixture(scope="module")
def one_slot(upstream, tmp_path_factory) -> Iterator[Relay]:
    with _relay(upstream, tmp_path_factory, "one-slot", RELAY_MAX_INFLIGHT="1",
                RELAY_QUEUE_TIMEOUT_MS="20000") as relay:
        yield relay


@pytest.fixture(scope="module")
def no_queue(upstream, tmp_path_factory) -> Iterator[Relay]:
    with _relay(upstream, tmp_path_factory, "no-queue", RELAY_MAX_INFLIGHT="2", RELAY_QUEUE_TIMEOUT_MS="0",
                RELAY_BODY_TIMEOUT_S="1") as relay:
        yield relay


@pytest.fixture(scope="module")
def two_slots(upstream, tmp_path_factory) -> Iterator[Relay]:
    with _relay(upstream, tmp_path_factory, "two-slots", RELAY_MAX_INFLIGHT="2",
                RELAY_QUEUE_TIMEOUT_MS="20000") as relay:
        yield relay


def _post(relay: Relay, key: str, model: str, *, path: str = "/v1/chat/completions", timeout: float = 30,
          content: bytes | None = None, **body: Any) -> tuple[httpx.Response | None, float]:
    """One call; (None, seconds) when the client gave up at `timeout`."""
    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}", "x-api-key": key}
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    if path == "/v1/messages":
        payload["max_tokens"] = 16
    try:
        response = httpx.post(relay.url + path, headers=headers, timeout=timeout,
                              **({"content": content} if content is not None else {"json": payload}))
        if body.get("stream"):
            response.read()
    except httpx.TimeoutException:
        return None, time.perf_counter() - t0
    return response, time.perf_counter() - t0


def _in_background(fn, *args, **kw) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args, **kw)), daemon=True)
    thread.start()
    return thread, out


def _metric(relay: Relay, name: str, label: str = "") -> float:
    text = httpx.get(relay.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))


def _refusal(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "overloaded")
    assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) > 0
    assert response.headers.get("x-request-id")


def test_beyond_the_limit_a_fast_503_before_the_body_is_read(no_queue):
    key = no_queue.new_key()["key"]
    holders = [_in_background(_post, no_queue, key, "slow-1500") for _ in range(2)]
    time.sleep(0.4)
    response, seconds = _post(no_queue, key, "plain-model")
    _refusal(response)
    assert seconds < 0.5
    # not even read: a body that is no JSON gets the same 503, not a 400
    broken, _ = _post(no_queue, key, "plain-model", content=b"{not json")
    _refusal(broken)
    # Anthropic's endpoint answers in Anthropic's shape (its SDK retries a 503 overloaded_error too)
    anthropic, _ = _post(no_queue, key, "plain-model", path="/v1/messages")
    assert anthropic.status_code == 503 and anthropic.json()["error"]["type"] == "overloaded_error"
    assert int(anthropic.headers["retry-after"]) >= 1
    # health checks, metrics, the admin API and a bad key never wait for a slot
    assert httpx.get(no_queue.url + "/health", timeout=5).status_code == 200
    assert httpx.get(no_queue.url + "/metrics", timeout=5).status_code == 200
    assert no_queue.admin("GET", "/admin/tenants").status_code == 200
    assert _post(no_queue, "sk-wrong", "plain-model")[0].status_code == 401
    for thread, out in holders:
        thread.join()
        assert out[0][0].status_code == 200
    assert _post(no_queue, key, "plain-model")[0].status_code == 200
    assert _metric(no_queue, "relay_shed_requests_total", 'reason="overloaded"') >= 3


def test_a_second_authorization_header_does_not_dodge_the_limit(no_queue):
    key = no_queue.new_key()["key"]
    holders = [_in_background(_post, no_queue, key, "slow-1500") for _ in range(2)]
    time.sleep(0.4)
    twice = httpx.post(no_queue.url + "/v1/chat/completions", timeout=10,
                       headers=[("Authorization", f"Bearer {key}"), ("Authorization", "Bearer sk-garbage"),
                                ("Content-Type", "application/json")],
                       content=b'{"model": "plain-model", "messages": [{"role": "user", "content": "hi"}]}')
    _refusal(twice)
    for thread, _ in holders:
        thread.join()


def _dribble(relay: Relay, key: str) -> socket.socket:
    """A request whose headers promise a 100-byte body of which 10 bytes come."""
    host, port = relay.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                 "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ".encode())
    return sock


def test_clients_that_dribble_their_bodies_hold_no_slot_and_get_a_408(no_queue):
    key = no_queue.new_key()["key"]
    dribblers = [_dribble(no_queue, key) for _ in range(4)]  # twice the limit
    time.sleep(0.2)
    served, _ = _post(no_queue, key, "plain-model")
    assert served.status_code == 200
    for sock in dribblers:
        answer = b""
        while chunk := sock.recv(4096):  # the relay closes the connection after its 408
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b'"code":"request_timeout"' in answer
        sock.close()


def test_waiting_requests_are_served_in_arrival_order(one_slot, upstream):
    fake, _ = upstream
    holder = _in_background(_post, one_slot, one_slot.new_key()["key"], "slow-900")
    time.sleep(0.3)
    waiters = []
    for model in ("slow-301", "slow-302", "slow-303"):  # three tenants: each may queue one
        waiters.append(_in_background(_post, one_slot, one_slot.new_key()["key"], model))
        time.sleep(0.15)
    for thread, _ in [holder, *waiters]:
        thread.join()
    assert [out[0][0].status_code for _, out in [holder, *waiters]] == [200] * 4
    served = [c["body"]["model"] for c in fake.calls if c["body"].get("model") in ("slow-301", "slow-302", "slow-303")]
    assert served[-3:] == ["slow-301", "slow-302", "slow-303"]
    response = waiters[-1][1][0][0]
    assert "queue;dur=" in response.headers["server-timing"]  # it waited: how long is reported


def test_a_quiet_tenant_goes_before_a_bursting_one(two_slots, upstream):
    """Limit 2: the bulk tenant holds both slots and queues a third request; the quiet tenant's request, arriving
    later, takes the first slot freed, because the bulk tenant still holds its share (1 of 2)."""
    fake, _ = upstream
    bulk, quiet = two_slots.new_key()["key"], two_slots.new_key()["key"]
    first = [_in_background(_post, two_slots, bulk, model) for model in ("slow-600", "slow-1500")]
    time.sleep(0.3)
    late_bulk = _in_background(_post, two_slots, bulk, "slow-302")
    time.sleep(0.1)
    quiet_call = _in_background(_post, two_slots, quiet, "slow-303")
    for thread, _ in [*first, late_bulk, quiet_call]:
        thread.join()
    assert all(out[0][0].status_code == 200 for _, out in [*first, late_bulk, quiet_call])
    order = [c["body"]["model"] for c in fake.calls if c["body"].get("model") in ("slow-302", "slow-303")]
    assert order[-2:] == ["slow-303", "slow-302"]
    assert quiet_call[1][0][1] < late_bulk[1][0][1]


def test_a_client_that_leaves_while_waiting_is_never_sent_upstream(one_slot, upstream):
    fake, _ = upstream
    key = one_slot.new_key()["key"]
    gone_before = _metric(one_slot, "relay_shed_requests_total", 'reason="client_gone"')
    holder = _in_background(_post, one_slot, key, "slow-2000")
    time.sleep(0.3)
    plain, _ = _post(one_slot, key, "slow-200", timeout=0.5)
    streamed, _ = _post(one_slot, key, "slow-300", timeout=0.5, stream=True)
    assert plain is None and streamed is None  # the client gave up while they waited
    holder[0].join()
    time.sleep(0.5)
    recent = [c["body"]["model"] for c in fake.calls[-5:]]
    assert "slow-200" not in recent and "slow-300" not in recent
    assert _metric(one_slot, "relay_shed_requests_total", 'reason="client_gone"') == gone_before + 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_mid_call_cancels_the_upstream_call(one_slot, upstream, stream):
    fake, _ = upstream
    tenant = one_slot.ok("POST", "/admin/tenants", {"name": f"leaver-{stream}"})
    key = one_slot.ok("POST", "/admin/keys", {"tenant_id": tenant["id"], "name": "k"})["key"]
    abandoned = fake.abandoned.count("slow-4000")
    t0 = time.perf_counter()
    assert _post(one_slot, key, "slow-4000", timeout=0.8, stream=stream)[0] is None
    deadline = time.time() + 3
    while fake.abandoned.count("slow-4000") == abandoned and time.time() < deadline:
        time.sleep(0.05)
    assert fake.abandoned.count("slow-4000") == abandoned + 1
    assert time.perf_counter() - t0 < 3.5  # not when the 4 s answer would have come
    [row] = one_slot.logs(tenant["id"])
    assert (row["status_code"], row["error_type"]) == (499, "client_disconnected")
    assert row["prompt_tokens"] > 0  # the upstream had read the prompt: that much is billed
    # and its slot is free again at once
    assert _post(one_slot, key, "plain-model", timeout=5)[0].status_code == 200


@pytest.fixture(scope="module")
def roomy(upstream, tmp_path_factory) -> Iterator[Relay]:
    with _relay(upstream, tmp_path_factory, "roomy", RELAY_MAX_INFLIGHT="64") as relay:
        yield relay


def test_a_channel_at_its_max_inflight_fails_over_then_sheds(roomy, upstream):
    first = add_fake_channel(roomy, upstream[1], "narrow-a", ["narrow"], model_mapping={"narrow": "slow-1500"},
                             max_inflight=1, priority=10)
    add_fake_channel(roomy, upstream[1], "narrow-b", ["narrow"], model_mapping={"narrow": "slow-1500"},
                     max_inflight=1, priority=0)
    assert first["max_inflight"] == 1
    key = roomy.new_key()["key"]
    time.sleep(1.0)  # the relay's config poll
    with ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(_post, roomy, key, "narrow") for _ in range(2)]
        time.sleep(0.4)
        third, seconds = _post(roomy, key, "narrow")
        answers = [c.result()[0] for c in calls]
    _refusal(third)
    assert third.json()["error"]["message"].startswith("Every channel serving this model is at its limit")
    assert seconds < 1.0
    assert sorted(a.headers["x-relay-channel"] for a in answers) == ["narrow-a", "narrow-b"]
    assert _post(roomy, key, "narrow")[0].status_code == 200  # both free again
    # a stream whose client leaves before its first chunk gives its channel's slot back
    for _ in range(3):
        assert _post(roomy, key, "narrow", stream=True, timeout=0.3)[0] is None
    time.sleep(0.3)
    both = [_in_background(_post, roomy, key, "narrow") for _ in range(2)]
    assert all(out[0][0].status_code == 200 for thread, out in both if not thread.join())


def test_an_upstream_at_capacity_fails_over_and_its_retry_after_reaches_the_client(roomy, upstream):
    add_fake_channel(roomy, upstream[1], "full-worker", ["full", "only-full"],
                     model_mapping={"full": "busy-7", "only-full": "busy-7"}, priority=10)
    add_fake_channel(roomy, upstream[1], "spare", ["full"], model_mapping={"full": "plain-model"}, priority=0)
    key = roomy.new_key()["key"]
    time.sleep(1.0)
    answer, _ = _post(roomy, key, "full")
    assert answer.status_code == 200 and answer.headers["x-relay-channel"] == "spare"
    refused, _ = _post(roomy, key, "only-full")
    _refusal(refused)
    assert 7 <= int(refused.headers["retry-after"]) <= 11  # the upstream's 7 s, spread by up to half


@pytest.fixture(scope="module")
def full_worker(tmp_path_factory) -> Iterator[str]:
    """A real worker that holds one sequence and lets none wait (`--max-batch 1 --max-waiting 0`)."""
    with run_worker(tmp_path_factory.mktemp("full-worker"), "tiny-qwen2", "--max-batch", "1",
                    "--max-waiting", "0") as url:
        yield url


def test_a_full_worker_fails_over_to_the_next_channel_and_alone_passes_its_503_on(roomy, upstream, full_worker):
    roomy.ok("POST", "/admin/channels", {"name": "worker", "type": "local", "base_url": full_worker, "priority": 10,
                                         "models": ["tiny", "tiny-only"],
                                         "model_mapping": {"tiny": "tiny-qwen2", "tiny-only": "tiny-qwen2"}})
    add_fake_channel(roomy, upstream[1], "worker-spare", ["tiny"], model_mapping={"tiny": "plain-model"})
    key = roomy.new_key()["key"]
    time.sleep(1.0)
    long = {"max_tokens": 80, "logit_bias": {"9707": 100}}  # "Hello" 80 times: a second or more on the CPU
    with ThreadPoolExecutor(3) as pool:
        holder = pool.submit(_post, roomy, key, "tiny-only", **long)
        time.sleep(0.5)  # the worker is generating for it now
        spilled = [pool.submit(_post, roomy, key, "tiny", **long) for _ in range(2)]
        alone, _ = _post(roomy, key, "tiny-only", **long)
        answers = [f.result()[0] for f in spilled]
    assert holder.result()[0].status_code == 200
    assert [(a.status_code, a.headers["x-relay-channel"]) for a in answers] == [(200, "worker-spare")] * 2
    _refusal(alone)  # the worker's own 503, its Retry-After passed on
    assert "upstream channel is at capacity" in alone.json()["error"]["message"]
