"""The parameter probe: a bounded grid of tiny requests sent straight to one channel (no policy in between),
each outcome classified, and the policy that would have kept the channel's users out of trouble proposed.

The grid: temperature 1.0 down to 0 (bisected where the outcome flips, to within 0.05), top_p 0 and 1e-9,
top_k -1/0/1 (and top_k 1 at the floor, the way a top_k_one policy sends greedy requests), a seed sent three times
against a control seed, logprobs, n=2, response_format json_object, and a stream asking for usage. At most
MAX_REQUESTS requests, one at a time, MIN_GAP_S apart (longer after the upstream said it is busy), within
DEADLINE_S; each asks for at most two tokens.

Only decided outcomes shape the proposal: an upstream that was busy, unreachable or slow for a check leaves it
undecided, and a probe with undecided temperature checks proposes nothing about temperature (and cannot be
applied)."""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from channels.base import Channel, UpstreamError

MAX_REQUESTS = 40
DEADLINE_S = 60.0
MIN_GAP_S = 0.05  # its own rate limit, from one answer to the next request: a small upstream is never hammered
BUSY_GAP_S = 1.0  # after a 429 or a timeout
CALL_TIMEOUT_S = 15.0
MAX_STREAM_CHUNKS = 64
TEMPERATURES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 1e-5, 0.0)
RESOLUTION = 0.05  # the floor is found to within this
MESSAGES = [{"role": "user", "content": "Say OK."}]
RANDOM = [{"role": "user", "content": "Pick a random number between 1 and 1000000. Answer with the number only."}]
# The channel could not be asked (busy, unreachable, refused the relay's key, no such model): no verdict.
UNAVAILABLE = {"upstream_rate_limited", "timeout", "connect_error", "upstream_auth", "upstream_not_found"}
FAILED = ("crash", "must_be_positive", "rejected", "error")  # the value itself was refused
UNDECIDED = ("unavailable", "timeout", "skipped")

_CRASH = re.compile(r"probability tensor|\b(inf|nan)\b.{0,12}\b(nan|inf)\b", re.IGNORECASE)
_POSITIVE = re.compile(r"must be (strictly )?positive|greater than 0(?![.\d])|> ?0(?![.\d])", re.IGNORECASE)


@dataclass
class Outcome:
    check: str  # e.g. "temperature=0.3"
    sent: dict[str, Any]
    result: str  # ok | crash | must_be_positive | rejected | error | ignored | unavailable | timeout | skipped
    detail: str = ""
    text: str | None = None  # the answer's text (seed checks)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "sent": self.sent, "result": self.result, "detail": self.detail[:300]}


class _OutOfBudget(Exception):
    pass


@dataclass
class Probe:
    channel: Channel
    model: str  # the upstream model name
    secret: str | None = None  # the channel's key: never part of a stored detail
    outcomes: list[Outcome] = field(default_factory=list)
    requests: int = 0
    started: float = field(default_factory=time.monotonic)
    _ready_at: float = 0.0

    async def call(self, params: dict[str, Any], messages: list[dict[str, str]], stream: bool) -> Any:
        if self.requests >= MAX_REQUESTS or time.monotonic() - self.started > DEADLINE_S:
            raise _OutOfBudget
        if (wait := self._ready_at - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        self.requests += 1
        request = {"model": self.model, "messages": messages, "max_tokens": 2, **params}
        timeout = max(0.1, min(CALL_TIMEOUT_S, DEADLINE_S - (time.monotonic() - self.started)))
        try:
            if stream:
                async def collect() -> list[dict[str, Any]]:
                    chunks = []
                    async for chunk in self.channel.chat_stream({**request, "stream": True}):
                        chunks.append(chunk)
                        if len(chunks) >= MAX_STREAM_CHUNKS:
                            break
                    return chunks
                return await asyncio.wait_for(collect(), timeout)
            return await asyncio.wait_for(self.channel.chat(request), timeout)
        finally:
            self._ready_at = time.monotonic() + MIN_GAP_S

    async def check(self, name: str, params: dict[str, Any], *, stream: bool = False, effect: Any = None,
                    messages: list[dict[str, str]] = MESSAGES) -> Outcome:
        """One request; `effect(answer)` returns a reason when the parameter was accepted but had no effect."""
        text = None
        try:
            answer = await self.call(params, messages, stream)
            reason = effect(answer) if effect is not None else None
            if not stream:
                text = str(((answer.get("choices") or [{}])[0].get("message") or {}).get("content"))
            outcome = Outcome(name, params, "ignored" if reason else "ok", reason or "", text)
        except _OutOfBudget:
            outcome = Outcome(name, params, "skipped", "the probe's request or time budget ran out")
        except TimeoutError:
            outcome = Outcome(name, params, "timeout", f"no answer within {CALL_TIMEOUT_S:g} s")
        except UpstreamError as exc:
            said = exc.upstream_message or exc.message
            result = "unavailable" if exc.kind in UNAVAILABLE else classify(exc.status, said)
            outcome = Outcome(name, params, result, f"{exc.status}: {said}")
        except Exception as exc:  # a plugin's own failure is an outcome, never a 500 of the admin API
            outcome = Outcome(name, params, "error", f"{type(exc).__name__}: {exc}")
        if outcome.result in ("unavailable", "timeout"):
            self._ready_at = time.monotonic() + BUSY_GAP_S  # the upstream is struggling: back off
        if self.secret:
            outcome.detail = outcome.detail.replace(self.secret, "***")
        self.outcomes.append(outcome)
        return outcome


def classify(status: int, message: str) -> str:
    if _CRASH.search(message):
        return "crash"  # the Qwen1.5 sampler's inf/nan error, whatever status the upstream wrapped it in
    if _POSITIVE.search(message):
        return "must_be_positive"
    if status in (400, 422):
        return "rejected"
    return "error"


async def run_probe(channel: Channel, upstream_model: str, secret: str | None = None) -> dict[str, Any]:
    """Runs the grid against one channel's upstream model; the table, what it means, and the proposed rules."""
    probe = Probe(channel, upstream_model, secret)
    base = await probe.check("baseline (no sampling parameters)", {})
    if base.result != "ok":
        return _report(probe, None, f"the channel does not answer a plain request ({base.detail})")
    temps = {t: await probe.check(f"temperature={t:g}", {"temperature": t}) for t in TEMPERATURES}
    floor = await _bisect(probe, temps)
    for name, params in (("top_p=0", {"top_p": 0}), ("top_p=1e-9", {"top_p": 1e-9}),
                         ("top_k=-1", {"top_k": -1}), ("top_k=0", {"top_k": 0}), ("top_k=1", {"top_k": 1})):
        await probe.check(name, params)
    # How a top_k_one policy asks for the greedy token: top_k 1 at a temperature the channel takes.
    await probe.check("top_k=1 at the floor", {"top_k": 1, "temperature": floor or 1.0})
    for i in range(3):
        await probe.check(f"seed=1234 ({i + 1})", {"seed": 1234, "temperature": 1.0}, messages=RANDOM)
    await probe.check("seed=98765 (control)", {"seed": 98765, "temperature": 1.0}, messages=RANDOM)
    await probe.check("logprobs", {"logprobs": True, "top_logprobs": 1},
                      effect=lambda a: None if (a["choices"][0].get("logprobs") or {}).get("content")
                      else "no logprobs in the answer")
    await probe.check("n=2", {"n": 2}, effect=lambda a: None if len(a["choices"]) == 2 else
                      f"{len(a['choices'])} choice(s) for n=2")
    await probe.check("response_format json_object", {"response_format": {"type": "json_object"}})
    await probe.check("stream with stream_options.include_usage", {"stream_options": {"include_usage": True}},
                      stream=True, effect=lambda chunks: None if any(c.get("usage") for c in chunks)
                      else "no usage chunk")
    return _report(probe, floor, None)


async def _bisect(probe: Probe, temps: dict[float, Outcome]) -> float | None:
    """The lowest temperature verified to work above the highest positive one that failed (None: none failed,
    or nothing above it was verified to work)."""
    failing = [t for t, o in temps.items() if t > 0 and o.result in FAILED]
    if not failing:
        return None
    low = max(failing)
    working = [t for t, o in temps.items() if t > low and o.result == "ok"]
    if not working:
        return None  # inconclusive: a floor no working value was seen above is no floor to apply
    high = min(working)
    while high - low > RESOLUTION + 1e-9:
        mid = round((low + high) / 2, 4)
        outcome = await probe.check(f"temperature={mid:g} (bisecting)", {"temperature": mid})
        if outcome.result == "ok":
            high = mid
        elif outcome.result in FAILED:
            low = mid
        else:
            break  # undecided: keep the last verified bounds
    return math.ceil(high * 100 - 1e-9) / 100  # rounded up: never below the value verified to work


def _report(probe: Probe, floor: float | None, unreachable: str | None) -> dict[str, Any]:
    table = [o.as_dict() for o in probe.outcomes]
    undecided = [o.check for o in probe.outcomes if o.result in UNDECIDED]
    out: dict[str, Any] = {"model": probe.model, "requests": probe.requests,
                           "seconds": round(time.monotonic() - probe.started, 3), "complete": not undecided,
                           "undecided": undecided, "outcomes": table}
    if unreachable:
        out["error"] = unreachable
        out["complete"] = False
        return out
    rules, capabilities = propose(probe.outcomes, floor)
    out.update(temperature_floor=floor, rules=rules, capabilities=capabilities)
    return out


def propose(outcomes: list[Outcome], floor: float | None) -> tuple[dict[str, Any], dict[str, bool]]:
    """Rules (the policy schema of relay.policy_rules) and capabilities that the decided outcomes call for."""
    seen = {o.check: o for o in outcomes}

    def result(check: str) -> str:
        return seen[check].result if check in seen else "skipped"

    rules: dict[str, Any] = {}
    temperature_checks = [o for o in outcomes if set(o.sent) == {"temperature"}]
    if temperature_checks and not any(o.result in UNDECIDED for o in temperature_checks):
        zero_works = result("temperature=0") == "ok"
        top_k_one = result("top_k=1 at the floor") == "ok"
        temperature: dict[str, Any] = {"greedy_below": 0.01}
        if floor is not None:
            temperature["min"] = floor
        rules["greedy_as"] = "top_k_one" if not zero_works and top_k_one else "temperature_zero"
        if not zero_works and not top_k_one:
            # no way of asking for the greedy token works: clamp to the coolest temperature that does
            working = sorted(float(o.sent["temperature"]) for o in temperature_checks
                             if o.sent["temperature"] > 0 and o.result == "ok")
            temperature = {"min": max(floor or 0.0, working[0] if working else 1.0)}
        if floor is not None or not zero_works:
            rules["temperature"] = temperature
    if result("top_p=0") in FAILED and result("top_p=1e-9") not in UNDECIDED:
        rules["top_p"] = {"min": 0.01}
    drop: list[str] = []
    for params, check in ((["top_k"], "top_k=1"), (["seed"], "seed=1234 (1)"),
                          (["logprobs", "top_logprobs"], "logprobs"), (["n"], "n=2"),
                          (["response_format"], "response_format json_object")):
        if result(check) == "rejected":
            drop.extend(params)
    if "top_k" in drop and rules.get("greedy_as") == "top_k_one":
        rules["greedy_as"] = "temperature_zero"
    if drop:
        rules["drop"] = drop
    seeded = [seen.get(f"seed=1234 ({i})") for i in (1, 2, 3)]
    control = seen.get("seed=98765 (control)")
    # The same seed three times gives one answer, and another seed a different one (else the prompt was not
    # random enough to tell, and nothing is claimed).
    reproducible = (all(o is not None and o.result == "ok" for o in seeded) and control is not None
                    and control.result == "ok" and len({o.text for o in seeded}) == 1  # type: ignore[union-attr]
                    and control.text != seeded[0].text)  # type: ignore[union-attr]
    capabilities = {"seeded_determinism": reproducible,
                    "stream_usage": result("stream with stream_options.include_usage") == "ok"}
    return rules, capabilities


def explain_zero(model: str, rules: dict[str, Any]) -> dict[str, Any]:
    """What the proposed rules make of a temperature-0 request (the classic crash) for this model."""
    from relay.policy import PolicyInfo, apply_policy
    from relay.policy_rules import Rules

    info = PolicyInfo(id=0, version=0, model_pattern=model, tenant_id=None, priority=0,
                      rules=Rules.model_validate(rules))
    sent = {"model": model, "messages": MESSAGES, "temperature": 0}
    outcome = apply_policy([info], sent, None)
    return {"request": sent, "rewrites": outcome.rewrites, "final": outcome.request}


_running: set[int] = set()  # channels being probed by this process: a second probe of one is refused


async def probe_and_record(s: Any, channel_id: int, box: Any, model: str | None, apply: bool, actor: str,
                           in_thread: Any, close_connections: bool = False) -> dict[str, Any]:
    """The probe of a channel (for the admin API and the CLI): run, stored on the channel, and with `apply`
    written as policies through admin.service. `in_thread(fn, *args)` runs database work off the event loop; the
    session holds no connection while the upstream is asked. `close_connections`: a one-off event loop (the CLI)
    closes its upstream connections before it ends."""
    from admin import service
    from admin.crud import get_or_404
    from admin.schemas import ChannelOut
    from channels.openai_http import close_sessions
    from channels.registry import build
    from relay.catalog import channel_config
    from relay.errors import APIError, bad_request
    from relay.models import Channel as ChannelRow

    row = await in_thread(get_or_404, s, ChannelRow, channel_id, "channel")
    config = channel_config(row, box)
    await in_thread(s.close)
    if model is not None and model not in config.models:
        raise bad_request(f"The channel does not serve `{model[:200]}`; it serves {', '.join(config.models)}.",
                          "model")
    if channel_id in _running:
        raise APIError(409, "This channel is being probed already; wait for that probe's answer.",
                       "invalid_request_error", None, "probe_in_progress")
    served = model or config.models[0]
    upstream = config.upstream_model(served)
    _running.add(channel_id)
    try:
        try:
            channel = build(config)
        except Exception as exc:  # an unknown or broken plugin type: the probe's error, not a 500
            result: dict[str, Any] = {"model": upstream, "requests": 0, "complete": False, "outcomes": [],
                                      "error": f"the channel cannot be built: {type(exc).__name__}: {exc}"}
        else:
            result = await run_probe(channel, upstream, config.api_key)
    finally:
        _running.discard(channel_id)
        if close_connections:
            await close_sessions()
    result["channel_model"] = served
    # Every model of the channel that reaches the same upstream model has the same ranges; others were not asked.
    result["models"] = [m for m in config.models if config.upstream_model(m) == upstream]
    if "rules" in result:
        result["explain"] = explain_zero(served, result["rules"])
    row = await in_thread(service.record_probe, s, channel_id, result)
    answer = {"channel": ChannelOut.of(row).model_dump(mode="json", exclude={"probe"}), **result}
    if apply:
        if "rules" not in result or not result["complete"]:
            raise bad_request("Nothing to apply: the probe was not complete ("
                              f"{result.get('error') or ', '.join(result.get('undecided', []))}); run it again.",
                              "apply")
        policies = await in_thread(service.apply_probed_rules, s, result["models"], result["rules"], actor)
        answer["applied"] = [{"id": p.id, "model_pattern": p.model_pattern, "version": p.version,
                              "rules": p.rules} for p in policies]
    return answer
