"""Channel plugins: the registry, routing order, and the `litellm` channel type over real HTTP."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from channels.base import Channel, ChannelConfig
from channels.openai_compat import api_base
from channels.registry import build, channel_types
from relay.routing import candidates


def test_registry_has_builtins_from_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="policy_relay.channels")}
    assert {"openai", "litellm"} <= names
    assert {"openai", "litellm"} <= set(channel_types())
    with pytest.raises(ValueError, match="unknown channel type"):
        build(ChannelConfig(1, "x", "no-such-type", None, None, ("m",)))


@pytest.mark.parametrize(("base", "expected"), [
    ("https://api.example.com", "https://api.example.com/v1"),
    ("https://api.example.com/", "https://api.example.com/v1"),
    ("http://127.0.0.1:3000/v1", "http://127.0.0.1:3000/v1"),
    ("https://gw.example.com/openai/v1/", "https://gw.example.com/openai/v1"),
])
def test_openai_base_url_with_or_without_v1(base, expected):
    assert api_base(base) == expected


def _channel(cid: int, priority: int, weight: int) -> Channel:
    return build(ChannelConfig(cid, f"c{cid}", "openai", "http://x", None, ("m",), priority=priority, weight=weight))


def test_priority_tier_first_then_weighted_split():
    high_a, high_b, low = _channel(1, 10, 3), _channel(2, 10, 1), _channel(3, 0, 100)
    rng = random.Random(7)
    firsts = Counter()
    for _ in range(4000):
        order = candidates([low, high_b, high_a], rng)
        assert order[-1] is low  # the lower tier only ever comes after the whole higher tier
        firsts[order[0].config.id] += 1
    share = firsts[1] / 4000
    assert 0.72 < share < 0.78  # weight 3 : 1 → 75 %


def test_zero_weight_goes_last():
    rng = random.Random(1)
    zero, one = _channel(1, 0, 0), _channel(2, 0, 1)
    assert all(candidates([zero, one], rng)[0] is one for _ in range(200))


def test_litellm_channel_type(relay, upstream, calls):
    relay.ok("POST", "/admin/channels", {
        "name": f"via-litellm-{relay.url.rsplit(':', 1)[1]}", "type": "litellm", "models": ["lt-model"],
        "base_url": upstream[1] + "/v1", "api_key": "upstream-secret", "options": {"model": "openai/lt-upstream"}})
    client = relay.client(relay.new_key()["key"])
    answer = client.chat.completions.create(model="lt-model", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello from lt-upstream"
    chunks = list(client.chat.completions.create(model="lt-model", messages=[{"role": "user", "content": "hi"}],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from lt-upstream"
    assert [c["body"]["model"] for c in calls] == ["lt-upstream", "lt-upstream"]


def test_an_argument_the_sdk_refuses_is_the_requests_400(upstream, calls):
    """litellm fails before sending anything when an SDK method does not take an argument: that is the
    request's error (not retried, not counted against the channel), naming the argument."""
    import asyncio

    import litellm

    from channels.base import UpstreamError
    from channels.litellm_base import classify

    channel = build(ChannelConfig(1, "c", "openai", upstream[1], "upstream-secret", ("m",)))
    kwargs = channel._kwargs({"model": "m", "prompt": "hi"}, text=True)

    async def call() -> UpstreamError:
        try:
            await litellm.atext_completion(**kwargs, tools=[{"type": "function", "function": {"name": "f"}}])
        except Exception as exc:
            return classify(exc)
        raise AssertionError("litellm sent it")

    error = asyncio.run(call())
    assert (error.status, error.retryable, error.param) == (400, False, "tools")
    assert calls == []


def test_a_plugin_cannot_take_a_builtin_channel_types_name(tmp_path):
    """A third-party package whose entry point reuses `openai` is refused at start, naming both targets."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    dist = tmp_path / "shadowing_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shadowing-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[policy_relay.channels]\nopenai = shadowing_plugin:Impostor\n")
    result = subprocess.run([sys.executable, "-c", "from channels.registry import channel_types; channel_types()"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    assert "two channel types are named 'openai'" in result.stderr and "shadowing_plugin:Impostor" in result.stderr
