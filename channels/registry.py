"""Channel types by name, loaded from the `policy_relay.channels` entry-point group, so a
third-party package adds a type with no edit here (simonw/llm-style)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points

from channels.base import Channel, ChannelConfig

ENTRY_POINT_GROUP = "policy_relay.channels"

# The built-ins, also reachable when the package is run from a source tree without being installed.
_BUILTIN = {
    "openai": "channels.openai_compat:OpenAIChannel",
    "litellm": "channels.litellm_provider:LiteLLMChannel",
    "local": "channels.local:LocalChannel",
}


@cache
def channel_types() -> dict[str, type[Channel]]:
    """Every channel type by name. Two types claiming one name (a plugin shadowing a built-in, or two plugins)
    is an error at start: silently picking one would route some operator's channels to the wrong code."""
    targets = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if targets.setdefault(ep.name, ep.value) != ep.value:
            raise RuntimeError(f"two channel types are named {ep.name!r}: {targets[ep.name]} and {ep.value} "
                               f"(entry-point group {ENTRY_POINT_GROUP}); rename one")
    found: dict[str, type[Channel]] = {}
    for name, target in targets.items():
        module, _, attr = target.partition(":")
        found[name] = getattr(__import__(module, fromlist=[attr]), attr)
    return found


def build(config: ChannelConfig) -> Channel:
    try:
        cls = channel_types()[config.type]
    except KeyError:
        raise ValueError(f"unknown channel type {config.type!r}; known: {sorted(channel_types())}") from None
    return cls(config)
