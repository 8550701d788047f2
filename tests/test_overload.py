"""Overload, end to end: real `serve` processes with small in-flight limits in front of the fake upstream (its
`slow-<ms>` models hold a slot as long as asked, and note a client that left; `busy-<s>` answers 503 overloaded).
Refusals come before the body is read, waiting requests are served in order and fairly, health checks and the
admin API never wait, clients that leave are not served, and channels' max_inflight sheds or fails over."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Relay, add_fake_channel, database, run_relay, run_server, run_worker

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
    assert _metric(no_queue, "relay_shed_requests_total", 'reason="inflight_limit"') >= 3


def _read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer with a Content-Length, read off a raw socket: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_a_refusal_on_arrival_keeps_the_connection_usable(no_queue):
    """The server answers a refusal itself (relay.http_protocol): the body it never read is skipped, the connection
    serves the next request, the client's request id comes back; an HTTP/1.0 client's connection is closed."""
    key = no_queue.new_key()["key"]
    holders = [_in_background(_post, no_queue, key, "slow-1500") for _ in range(2)]
    time.sleep(0.4)
    host, port = no_queue.url.removeprefix("http://").split(":")
    body = b'{"model": "plain-model", "messages": [{"role": "user", "content": "' + b"x" * 20000 + b'"}]}'
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\nX-Request-Id: mine-1\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        head, answer = _read_answer(sock)
        assert head.startswith(b"HTTP/1.1 503") and b"\r\nx-request-id: mine-1" in head.lower()
        assert b"\r\nretry-after-ms: " in head.lower() and b"\r\ndate: " in head.lower()
        assert orjson.loads(answer)["error"]["code"] == "overloaded"
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = _read_answer(sock)
        assert head.startswith(b"HTTP/1.1 200")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
        head, _ = _read_answer(sock)
        assert head.startswith(b"HTTP/1.1 503") and b"\r\nconnection: close" in head.lower()
        assert sock.recv(1) == b""  # closed
    for thread, _ in holders:
        thread.join()


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
        assert b'"code":"request_timeout"' in answer and b"\r\nx-request-id: " in answer.lower()
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


@pytest.fixture(scope="module")
def slow_upstream(tmp_path_factory) -> Iterator[str]:
    """A fake upstream of its own (a process: a thousand held connections are its load, not the tests') that answers
    after 2 s."""
    with run_server(tmp_path_factory.mktemp("slow-upstream"), "tests.fake_upstream", "--delay-ms", "2000",
                    health="/v1/models") as url:
        yield url


def test_by_default_a_thousand_requests_wait_on_a_slow_upstream_and_none_is_refused(slow_upstream, tmp_path_factory):
    """Default settings: requests waiting on their upstream cost the gateway nothing, so 1,000 arriving within two
    seconds (a batch job, a ONE API deployment's open connections to a slow model) are all in flight together and
    all answered. The in-flight limit measured from request durations that came before refused most of them."""
    tmp = tmp_path_factory.mktemp("defaults")
    with database("sqlite", tmp) as url, run_relay(url, tmp) as relay:
        add_fake_channel(relay, slow_upstream, "slow", ["plain-model"])
        key = relay.new_key()["key"]
        body = {"model": "plain-model", "messages": [{"role": "user", "content": "hi"}]}

        host, port = relay.url.removeprefix("http://").split(":")
        raw = json.dumps(body).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw

        async def burst() -> tuple[list[int], float]:
            async def one(n: int) -> int:  # a connection each, raw: an HTTP client library would need the CPU
                await asyncio.sleep(n / 500)
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(request)
                status = int((await asyncio.wait_for(reader.readline(), 60)).split()[1])
                writer.close()
                return status

            calls = [asyncio.create_task(one(n)) for n in range(1000)]
            peak = 0.0
            while not all(c.done() for c in calls):
                await asyncio.sleep(0.25)
                peak = max(peak, await asyncio.to_thread(_metric, relay, "relay_requests_in_flight"))
            return [c.result() for c in calls], peak

        statuses, peak = asyncio.run(burst())
        assert statuses.count(200) == 1000, collections.Counter(statuses)
        assert peak >= 500  # hundreds in flight together (the limit before started at 64)
        assert _metric(relay, "relay_shed_requests_total") == 0
        text = httpx.get(relay.url + "/metrics", timeout=10).text
        assert "relay_inflight_limit NaN" in text  # no limit by default
        assert "relay_event_loop_lag_seconds_count" in text and "relay_event_loop_busy_ratio" in text
