"""What real clients send to the worker, on the random-weight tiny Qwen2 (the hardest case: it never ends a JSON
string by itself): structured outputs by constrained decoding, tool calls, prompt scoring, raw token bytes,
bounds, and a row's failure staying that row's."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import torch

from backends.server import create_worker_app
from tests.fake_upstream import ServerThread

MODEL = "tiny-qwen2"
ASK = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "required": ["city", "days"], "additionalProperties": False,
                   "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("max_tokens", [24, 60])
def test_json_object_always_parses_with_n_seeds_and_streams(tiny_client, max_tokens):
    answer = tiny_client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                            n=4, seed=11, temperature=1.0, max_tokens=max_tokens)
    for choice in answer.choices:
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
        assert choice.finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in tiny_client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, seed=5, max_tokens=max_tokens,
        stream=True) if c.choices)
    assert isinstance(json.loads(text), dict)


def test_json_schema_answers_validate_in_a_batch_with_free_rows(tiny_client):
    """Constrained and free rows decode together; every constrained answer validates, the free ones are prose."""
    def constrained(seed: int) -> str:
        return tiny_client.chat.completions.create(model=MODEL, messages=ASK, response_format=_schema_format(PERSON),
                                              seed=seed, temperature=1.0, max_tokens=40).choices[0].message.content

    def free(seed: int) -> str:
        return tiny_client.chat.completions.create(model=MODEL, messages=ASK, seed=seed, temperature=1.0,
                                              max_tokens=40).choices[0].message.content

    with ThreadPoolExecutor(12) as pool:
        typed = [pool.submit(constrained, s) for s in range(8)]
        prose = [pool.submit(free, s) for s in range(4)]
        for future in typed:
            jsonschema.validate(json.loads(future.result()), PERSON)
        assert all(isinstance(f.result(), str) for f in prose)
    assert sum(_not_json(f.result()) for f in prose) >= 3  # unconstrained rows stay unconstrained


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[:3].isdigit() and t[3] == "-"),
    ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
    ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
    ({"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"structured_outputs": {"regex": "(ab)+c"}}, lambda t: t.endswith("c") and set(t[:-1]) <= {"a", "b"}),
    ({"guided_grammar": 'root ::= "x" | "y" "z"'}, lambda t: t in ("x", "yz")),
])
def test_vllm_style_constraints_on_completions(tiny_client, extra, check):
    for seed in range(3):
        text = tiny_client.completions.create(model=MODEL, prompt="Answer:", max_tokens=40, seed=seed, temperature=1.0,
                                         extra_body=extra).choices[0].text
        assert check(text), text


def test_a_broken_constraint_is_a_400_naming_it(tiny_worker):
    for body, param in [({"guided_regex": "(unclosed"}, "guided_regex"),
                        ({"guided_json": "not json"}, "guided_json"),
                        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice")]:
        answer = httpx.post(tiny_worker.url + "/v1/completions", timeout=30,
                            json={"model": MODEL, "prompt": "x", "max_tokens": 5, **body})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_are_valid_calls(tiny_client, choice):
    for seed in range(3):
        answer = tiny_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                                tools=WEATHER, tool_choice=choice, seed=seed, temperature=1.0,
                                                max_tokens=60)
        message, reason = answer.choices[0].message, answer.choices[0].finish_reason
        assert reason == "tool_calls" and message.content is None
        call = message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER[0]["function"]["parameters"])


def test_streamed_tool_calls_come_as_openai_streams_them(tiny_client):
    chunks = [c for c in tiny_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Paris?"}], tools=WEATHER, tool_choice="required",
        seed=2, max_tokens=60, stream=True) if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"  # id and name first
    argument_deltas = [d.function.arguments for d in deltas[1:]]
    assert len(argument_deltas) >= 2 and all(d.id is None for d in deltas[1:])  # then arguments, in pieces
    jsonschema.validate(json.loads("".join(argument_deltas)), WEATHER[0]["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_renders_no_tools_and_auto_renders_them(tiny_client):
    def prompt_tokens(**kw) -> int:
        return tiny_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=1, **kw).usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(tools=WEATHER, tool_choice="none") == plain
    assert prompt_tokens(tools=WEATHER, tool_choice="auto") > plain + 20  # the template described the tool


def test_a_template_without_tools_says_so(tiny_lm):
    template = tiny_lm.tokenizer.chat_template
    tiny_lm.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                  "{% if add_generation_prompt %}assistant: {% endif %}")
    try:
        with ServerThread(create_worker_app(tiny_lm)) as server:
            answer = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": WEATHER, "max_tokens": 3})
            assert answer.status_code == 400 and answer.json()["error"]["param"] == "tools"
            assert "cannot render tools" in answer.json()["error"]["message"]
    finally:
        tiny_lm.tokenizer.chat_template = template


def _teacher_forced(tiny_lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = tiny_lm.model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)  # [L-1, V]: position i predicts token i+1


def test_echo_scores_the_prompt_like_a_teacher_forced_forward(tiny_client, tiny_lm):
    """An evaluation harness's request: echo, logprobs, max_tokens 0."""
    prompt = "The capital of France is Paris"
    answer = tiny_client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    choice = answer.choices[0]
    ids = tiny_lm.tokenizer.encode(prompt)
    assert choice.text == prompt and answer.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    reference = _teacher_forced(tiny_lm, ids)
    for i, token in enumerate(ids[1:], start=1):
        assert abs(lp.token_logprobs[i] - float(reference[i - 1, token])) < 1e-4
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == prompt
    echoed = tiny_client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=3, temperature=0)
    assert echoed.choices[0].text.startswith(prompt) and echoed.usage.completion_tokens == 3


def test_vllm_prompt_logprobs_on_both_endpoints(tiny_worker, tiny_lm):
    ids = tiny_lm.tokenizer.encode("one two three")
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}
    choice = httpx.post(tiny_worker.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]
    reference = _teacher_forced(tiny_lm, ids)
    assert choice["prompt_logprobs"][0] is None
    for i, entry in enumerate(choice["prompt_logprobs"][1:], start=1):
        assert abs(entry[str(ids[i])]["logprob"] - float(reference[i - 1, ids[i]])) < 1e-4
    chat = httpx.post(tiny_worker.url + "/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 0})
    assert chat.json()["prompt_logprobs"][0] is None and len(chat.json()["prompt_logprobs"]) > 3


def test_logprob_bytes_are_the_tokens_raw_bytes(tiny_client, tiny_lm):
    """A byte-fallback token (part of a multi-byte character): its bytes, not U+FFFD's."""
    from backends.vocab import Vocab

    vocab = Vocab(tiny_lm.tokenizer, tiny_lm.model.get_output_embeddings().weight.shape[0])
    partial = next(i for i in range(1000, 100_000) if _invalid_utf8(vocab.raw[i]))
    answer = tiny_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, temperature=0, logprobs=True,
                                            logit_bias={str(partial): 100})
    entry = answer.choices[0].logprobs.content[0]
    assert bytes(entry.bytes) == vocab.raw[partial] and bytes(entry.bytes) != "\ufffd".encode()


def _invalid_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["a"] * 20, "n": 4}, "n"),  # 80 sequences
    ({"prompt": "a", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
])
def test_bounds_are_400s(tiny_worker, body, param):
    answer = httpx.post(tiny_worker.url + "/v1/completions", json={"model": MODEL, "max_tokens": 2, **body}, timeout=30)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_a_rows_failure_ends_only_that_row(tiny_lm):
    """One row's grammar refuses its token mid-batch: that request fails, its neighbour finishes."""
    import asyncio

    from backends.engine import DoneEvent, Engine, GenRequest
    from backends.sampler import SamplingParams

    class Refusing:
        def fill_next_token_bitmask(self, bitmask, index):
            bitmask[index].fill_(-1)  # everything allowed...

        def accept_token(self, token):
            return False  # ...and then refused

    engine = Engine(tiny_lm, max_batch=4)
    engine.grammars.matcher = lambda compiled: Refusing() if compiled == "refusing" else None
    engine.start()

    async def run(grammar) -> DoneEvent:
        events = engine.submit(GenRequest(prompt_ids=[1, 2, 3], params=SamplingParams(temperature=0.0),
                                          max_tokens=8, grammar=grammar))
        while not isinstance(event := await events.get(), DoneEvent):
            pass
        return event

    async def both():
        return await asyncio.gather(run("refusing"), run(None))

    try:
        failed, ok = asyncio.run(both())
    finally:
        engine.stop()
    assert failed.finish_reason == "error" and "refused" in failed.error
    assert ok.finish_reason == "length" and ok.completion_tokens == 8


def test_incremental_detokenization_equals_a_whole_decode(tiny_lm):
    """Each step decodes a few tokens, not the answer again; the text that comes out is the whole decode's,
    for any text (emoji, CJK, combining marks split across byte-level tokens), cut at the first stop string."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from backends.text import TextStream

    tokenizer = tiny_lm.tokenizer

    @given(st.text(min_size=1, max_size=80), st.lists(st.text(min_size=1, max_size=3), max_size=2))
    @settings(max_examples=150, deadline=None, database=None)
    def check(text: str, stops: list[str]) -> None:
        ids = tokenizer.encode(text)
        stream, out = TextStream(tokenizer, tuple(stops)), ""
        for token in ids:
            stopped = stream.add(token)
            out += stream.release(stopped)
            if stopped:
                break
        else:
            stream.add(-1, final=True)
            out += stream.release(True)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [whole.find(s) for s in stops if s in whole]
        assert out == (whole[:min(cuts)] if cuts else whole)

    check()
