"""A real HTTP server that speaks OpenAI's chat/completions protocol, for tests and benchmarks.

It stands in for a remote provider (the one thing we do not control). It records every body it
receives, so tests can assert what reached the upstream. Behaviour is chosen by the upstream model
name: `fail-<status>[-credit|-deactivated]` answers that HTTP status (with a provider message about credit balance,
or the error code `account_deactivated`),
`huge-usage` reports absurd token counts, `slow-<ms>...` waits that long before answering (a client that leaves
meanwhile is noted in `abandoned`), `busy-<s>` answers 503 `overloaded` with Retry-After: <s>,
`json-by-temperature` answers broken JSON above temperature 0.5
(or with none) and valid JSON at or below it, `broken-tool-call` answers a tool call whose arguments are no JSON,
`json-redos` answers {"a": "aaa…a"} (40 a's, the input that makes
`^(a+)+X$` backtrack for ages), `words-<n>` answers n words (`capped-<n>` too, but cut at max_tokens with
finish_reason length), `numbered-<n>` n distinct words (w0 w1 …),
`drip-<n>-<ms>` answers n words and streams them one every <ms> milliseconds, `qwen15-like` fails sampling below
temperature 0.5 with Qwen1.5's inf/nan error (unless top_k=1), `no-top-k` refuses top_k, anything else answers
"Hello from <model>". /v1/embeddings answers unit vectors (8 numbers, or `dimensions`) hashed from each input.

Run alone: python -m tests.fake_upstream --port 9101 [--delay-ms 50]"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import threading
import time
from typing import Any

import uvicorn

from backends.wire import responses as wire


class FakeUpstream:
    def __init__(self, delay_s: float = 0.0, api_key: str | None = None, record: bool = True) -> None:
        self.delay_s = delay_s
        self.record = record
        self.api_key = api_key
        self.calls: list[dict[str, Any]] = []  # {"path", "body", "authorization"}
        self.abandoned: list[str] = []  # models of `slow-` requests whose client went away before the answer

    def reply_text(self, model: str, body: dict[str, Any]) -> str:
        if model == "json-by-temperature":
            hot = body.get("temperature") is None or body["temperature"] > 0.5
            return '{"answer": "broken' if hot else '{"answer": 42}'
        if model == "json-redos":
            return '{"a": "' + "a" * 40 + '"}'
        if model.startswith(("words-", "drip-", "capped-")):
            return " ".join(["word"] * int(model.split("-")[1]))
        if model.startswith("numbered-"):  # distinct words: LiteLLM stops a stream that repeats one chunk 100 times
            return " ".join(f"w{i}" for i in range(int(model.split("-")[1])))
        return f"Hello from {model}"

    async def __call__(self, scope, receive, send) -> None:
        raw = await read_body(scope, receive, send)
        if raw is None:
            return
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        if path.endswith("/models"):
            return await send_json(send, 200, wire.model_list([wire.model_card("fake", 0, "fake")]))
        body = json.loads(raw or b"{}")
        if self.record:
            self.calls.append({"path": path, "body": body, "authorization": headers.get("authorization"),
                               "request_id": headers.get("x-request-id")})
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return await send_json(send, 401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
        model = body.get("model", "")
        if model.startswith("fail-"):
            status = int(model.split("-")[1])
            message = "Your credit balance is too low" if model.endswith("-credit") else f"failing with {status}"
            code = "account_deactivated" if model.endswith("-deactivated") else None
            return await send_json(send, status, {"error": {"message": message, "type": "server_error", "code": code}})
        if refusal := _parameter_trouble(model, body):
            return await send_json(send, *refusal)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if model.startswith("busy-"):
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", model.split("-")[1].encode())]})
            return await send({"type": "http.response.body", "body": json.dumps({"error": {
                "message": "overloaded", "type": "server_error", "param": None, "code": "overloaded"}}).encode()})
        if model.startswith("slow-") and not await _wait_unless_gone(int(model.split("-")[1]) / 1000, receive):
            self.abandoned.append(model)
            return
        if path.endswith("/embeddings"):
            return await send_json(send, 200, embeddings(body))
        chat = path.endswith("/chat/completions")
        text = self.reply_text(model, body)
        words = [w + " " for w in text.split(" ")]
        words[-1] = words[-1].rstrip()
        finish, cap = "stop", body.get("max_tokens")
        if model.startswith("capped-") and isinstance(cap, int) and len(words) > cap:
            words, finish = words[:cap], "length"
            text = "".join(words)
        usage = wire.usage(10**20 if model == "huge-usage" else _count_prompt(body), len(words))
        head = wire.head(chat, model)
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            drip_s = int(model.split("-")[2]) / 1000 if model.startswith("drip-") else 0
            for word in words:
                if drip_s:
                    await asyncio.sleep(drip_s)
                piece = {"delta": {"role": "assistant", "content": word}} if chat else {"text": word}
                await _event(send, wire.chunk(head, chat, [{"index": 0, "finish_reason": None, **piece}]))
            end = {"index": 0, "finish_reason": finish, **({"delta": {}} if chat else {"text": ""})}
            await _event(send, wire.chunk(head, chat, [end]))
            if (body.get("stream_options") or {}).get("include_usage"):
                await _event(send, wire.chunk(head, chat, [], usage))
            await send({"type": "http.response.body", "body": wire.SSE_DONE})
            return
        if chat and model == "broken-tool-call":  # what small models emit: arguments that are no JSON
            call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
            choice = {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                      "finish_reason": "tool_calls", "logprobs": None}
        elif chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        await send_json(send, 200, wire.response(head, chat, [choice], usage))


async def _wait_unless_gone(seconds: float, receive) -> bool:
    """Sleeps `seconds`; False as soon as the client disconnects instead."""
    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait([watcher], timeout=seconds)
        return not done
    finally:
        watcher.cancel()


def _parameter_trouble(model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """`qwen15-like`: Qwen1.5 behind a transformers server — sampling below temperature 0.5 (0 included) fails
    with the inf/nan error, unless top_k=1 asks for the greedy token; `no-top-k` refuses the top_k field."""
    temperature = body.get("temperature")
    if (model.startswith("qwen15-like") and isinstance(temperature, int | float) and temperature < 0.5
            and body.get("top_k") != 1):
        return 500, {"error": {"message": "RuntimeError: probability tensor contains either `inf`, `nan` or "
                                          "element < 0", "type": "server_error", "code": None}}
    if model.startswith("no-top-k") and "top_k" in body:
        return 400, {"error": {"message": "Unrecognized request argument supplied: top_k",
                               "type": "invalid_request_error", "param": "top_k", "code": None}}
    return None


async def read_body(scope, receive, send) -> bytes | None:
    """The request body of a raw ASGI app; None for the lifespan protocol, which it answers."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return None
    raw = b""
    while True:
        message = await receive()
        raw += message.get("body", b"")
        if not message.get("more_body"):
            return raw


def fake_vector(item: Any, dimensions: int = 8) -> list[float]:
    """A unit vector that depends only on the input (a text or token ids): what a real embedding model gives."""
    digest = hashlib.sha256(json.dumps(item).encode()).digest()
    raw = [b - 127.5 for b in digest[:dimensions]]
    norm = math.sqrt(sum(x * x for x in raw))
    return [x / norm for x in raw]


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    items = body.get("input")
    items = [items] if isinstance(items, str) or (items and isinstance(items[0], int)) else items
    vectors = [fake_vector(item, body.get("dimensions") or 8) for item in items]
    tokens = sum(len(i) if isinstance(i, list) else len(i.split()) for i in items)
    return wire.embedding_list(body.get("model", ""), vectors, tokens, body.get("encoding_format"))


def _count_prompt(body: dict[str, Any]) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", "")).split()) for m in body["messages"]) + 3
    return len(str(body.get("prompt", "")).split())


async def send_json(send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})


async def _event(send, payload: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": wire.sse(payload), "more_body": True})


class ServerThread:
    """uvicorn on 127.0.0.1 in a background thread; port 0 picks a free port."""

    def __init__(self, app, port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(FakeUpstream(delay_s=args.delay_ms / 1000, record=False), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
