"""An OpenAPI fuzzer (schemathesis) against a real `serve`, driven by the app's own /openapi.json: every
operation of /v1 and /admin, with valid and invalid inputs, a bounded number of examples each. No answer may be
a 5xx, and every error must be in OpenAI's shape (Anthropic's on /v1/messages)."""

from __future__ import annotations

import json

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import ADMIN_TOKEN, add_fake_channel, run_relay

REDIS_URL = "redis://127.0.0.1:6379/4"
EXAMPLES = 25  # per operation and mode: about 1,300 requests in all


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, upstream):
    redis.Redis.from_url(REDIS_URL).flushdb()
    tmp = tmp_path_factory.mktemp("fuzz")
    with run_relay(f"sqlite:///{tmp / 'fuzz.db'}", tmp, env={"RELAY_REDIS_URL": REDIS_URL}) as relay:
        add_fake_channel(relay, upstream[1], "fake", ["gpt-x"])
        relay.ok("POST", "/admin/policies", {"model_pattern": "*", "preset": "qwen2.5"})
        yield relay, relay.new_key()["key"], schemathesis.openapi.from_url(relay.url + "/openapi.json")


def _check(response, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400 and " /v1/messages" in where:  # Anthropic's shape there (and count_tokens)
        body = json.loads(response.content)
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, f"{where}: {response.text[:300]}"
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif response.status_code >= 400:
        body = json.loads(response.content)
        assert set(body) == {"error"}, f"{where}: {response.text[:300]}"
        assert set(body["error"]) == {"message", "type", "param", "code"}, f"{where}: {response.text[:300]}"
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _fuzz(relay, schema, token: str, prefix: str) -> int:
    operations = [r.ok() for r in schema.get_all_operations() if r.ok().path.startswith(prefix)]
    assert operations
    sent: list[int] = []

    def runner(operation, mode: GenerationMode):
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {token}"}, timeout=30)
            sent.append(response.status_code)
            _check(response, f"{case.method} {case.formatted_path} {mode.value}")

        return run

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                runner(operation, mode)()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters or body)
                assert mode is GenerationMode.NEGATIVE, operation.path
    return len(sent)


def test_fuzz_openai_endpoints(fuzzed):
    relay, key, schema = fuzzed
    assert _fuzz(relay, schema, key, "/v1/") >= 4 * EXAMPLES


def test_fuzz_admin_api(fuzzed):
    relay, _, schema = fuzzed
    assert _fuzz(relay, schema, ADMIN_TOKEN, "/admin/") >= 20 * EXAMPLES

