"""The parameter probe: a bounded grid of tiny requests sent straight to one channel (no policy in between),
each outcome classified, and the policy that would have kept the channel's users out of trouble proposed.

The grid: temperature 1.0 down to 0 (bisected where the outcome flips, to within 0.05), top_p 0 and 1e-9,
top_k -1/0/1, a seed sent twice, logprobs, n=2, response_format json_object, and a stream asking for usage.
At most MAX_REQUESTS requests, one at a time, at most one per MIN_INTERVAL_S, within DEADLINE_S; each asks for
at most two tokens."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from channels.base import Channel, UpstreamError

MAX_REQUESTS = 40
DEADLINE_S = 60.0
MIN_INTERVAL_S = 0.05  # its own rate limit: a slow or small upstream is never hammered
CALL_TIMEOUT_S = 15.0
TEMPERATURES = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05, 1e-5, 0.0)
RESOLUTION = 0.05  # the floor is found to within this
MESSAGES = [{"role": "user", "content": "Say OK."}]

_CRASH = re.compile(r"probability tensor|inf.{0,3}nan|nan.{0,3}inf", re.IGNORECASE)
_POSITIVE = re.compile(r"must be (strictly )?positive|greater than 0|> ?0\b|must be > ?0", re.IGNORECASE)


@dataclass
class Outcome:
    check: str  # e.g. "temperature=0.3"
    sent: dict[str, Any]
    result: str  # ok | crash | must_be_positive | rejected | ignored | timeout | error | skipped
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "sent": self.sent, "result": self.result, "detail": self.detail[:300]}


@dataclass
class Probe:
    channel: Channel
    model: str  # the upstream model name
    outcomes: list[Outcome] = field(default_factory=list)
    requests: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    async def call(self, params: dict[str, Any], *, stream: bool = False) -> dict[str, Any] | list[dict[str, Any]]:
        if self.requests >= MAX_REQUESTS or time.monotonic() - self.started > DEADLINE_S:
            raise _OutOfBudget
        wait = self._last + MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self.requests += 1
        self._last = time.monotonic()
        request = {"model": self.model, "messages": MESSAGES, "max_tokens": 2, **params}
        timeout = min(CALL_TIMEOUT_S, DEADLINE_S - (time.monotonic() - self.started))
        if stream:
            async def collect() -> list[dict[str, Any]]:
                return [c async for c in self.channel.chat_stream({**request, "stream": True})]
            return await asyncio.wait_for(collect(), max(timeout, 0.1))
        return await asyncio.wait_for(self.channel.chat(request), max(timeout, 0.1))

    async def check(self, name: str, params: dict[str, Any], *, stream: bool = False,
                    effect: Any = None) -> Outcome:
        """One request; `effect(answer)` returns a reason when the parameter was accepted but had no effect."""
        try:
            answer = await self.call(params, stream=stream)
            reason = effect(answer) if effect is not None else None
            outcome = Outcome(name, params, "ignored" if reason else "ok", reason or "")
        except _OutOfBudget:
            outcome = Outcome(name, params, "skipped", "the probe's request or time budget ran out")
        except TimeoutError:
            outcome = Outcome(name, params, "timeout", f"no answer within {CALL_TIMEOUT_S:g} s")
        except UpstreamError as exc:
            said = exc.upstream_message or exc.message
            outcome = Outcome(name, params, classify(exc.status, said), f"{exc.status}: {said}")
        except Exception as exc:  # a plugin's own failure is an outcome, never a 500 of the admin API
            outcome = Outcome(name, params, "error", f"{type(exc).__name__}: {exc}")
        self.outcomes.append(outcome)
        return outcome


class _OutOfBudget(Exception):
    pass


def classify(status: int, message: str) -> str:
    if _CRASH.search(message):
        return "crash"  # the Qwen1.5 sampler's inf/nan error, whatever status the upstream wrapped it in
    if _POSITIVE.search(message):
        return "must_be_positive"
    if status in (400, 422):
        return "rejected"
    return "error"


def _failed(outcome: Outcome) -> bool:
    return outcome.result in ("crash", "must_be_positive", "error")


async def run_probe(channel: Channel, upstream_model: str) -> dict[str, Any]:
    """Runs the grid against one channel's upstream model; the table, what it means, and the proposed rules."""
    probe = Probe(channel, upstream_model)
    base = await probe.check("baseline (no sampling parameters)", {})
    if base.result != "ok":
        return _report(probe, None, f"the channel does not answer a plain request ({base.detail})")
    temps = {t: await probe.check(f"temperature={t:g}", {"temperature": t}) for t in TEMPERATURES}
    floor = await _bisect(probe, temps)
    for name, params in (("top_p=0", {"top_p": 0}), ("top_p=1e-9", {"top_p": 1e-9}),
                         ("top_k=-1", {"top_k": -1}), ("top_k=0", {"top_k": 0}),
                         ("top_k=1", {"top_k": 1}), ("top_k=1, temperature=0", {"top_k": 1, "temperature": 0})):
        await probe.check(name, params)
    first = await probe.check("seed=1234 (1st)", {"seed": 1234, "temperature": 1.0, "max_tokens": 2})
    if first.result == "ok":
        texts: list[str] = []
        for i in range(2):
            answer = await _answer(probe, {"seed": 1234, "temperature": 1.0}, f"seed=1234 ({i + 2})")
            texts.append(answer)
        if len(set(texts)) > 1:
            probe.outcomes[-1].result, probe.outcomes[-1].detail = "ignored", "the same seed gave different answers"
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


async def _answer(probe: Probe, params: dict[str, Any], name: str) -> str:
    holder: dict[str, str] = {}

    def keep(answer: dict[str, Any]) -> None:
        holder["text"] = str(answer["choices"][0]["message"].get("content"))

    await probe.check(name, params, effect=keep)
    return holder.get("text", "")


async def _bisect(probe: Probe, temps: dict[float, Outcome]) -> float | None:
    """The lowest temperature that works, above the highest positive one that fails (None: none fails)."""
    failing = [t for t, o in temps.items() if t > 0 and _failed(o)]
    if not failing:
        return None
    low = max(failing)
    working = [t for t, o in temps.items() if t > low and o.result == "ok"]
    if not working:
        return 2.0  # nothing above it works either: the channel is broken, not fussy
    high = min(working)
    while high - low > RESOLUTION:
        mid = round((low + high) / 2, 4)
        outcome = await probe.check(f"temperature={mid:g} (bisecting)", {"temperature": mid})
        if outcome.result == "skipped":
            break
        if outcome.result == "ok":
            high = mid
        else:
            low = mid
    return round(high, 2) if round(high, 2) > low else round(high, 4)


def _report(probe: Probe, floor: float | None, unreachable: str | None) -> dict[str, Any]:
    table = [o.as_dict() for o in probe.outcomes]
    out: dict[str, Any] = {"model": probe.model, "requests": probe.requests,
                           "seconds": round(time.monotonic() - probe.started, 3), "outcomes": table}
    if unreachable:
        out["error"] = unreachable
        return out
    rules, capabilities = propose(probe.outcomes, floor)
    out.update(temperature_floor=floor, rules=rules, capabilities=capabilities)
    return out


def propose(outcomes: list[Outcome], floor: float | None) -> tuple[dict[str, Any], dict[str, bool]]:
    """Rules (the policy schema of relay.policy_rules) and capabilities that the outcomes call for."""
    seen = {o.check: o for o in outcomes}

    def result(check: str) -> str:
        return seen[check].result if check in seen else "skipped"

    rules: dict[str, Any] = {}
    temperature: dict[str, Any] = {"greedy_below": 0.01}
    if floor is not None:
        temperature["min"] = floor
    zero_works = result("temperature=0") == "ok"
    top_k_one = result("top_k=1") == "ok" and result("top_k=1, temperature=0") in ("ok", "skipped")
    rules["greedy_as"] = "top_k_one" if not zero_works and top_k_one else "temperature_zero"
    if not zero_works and not top_k_one:
        # no way to ask for the greedy answer works: clamp to the coolest temperature that does
        working = sorted(float(o.sent["temperature"]) for o in outcomes
                         if set(o.sent) == {"temperature"} and o.sent["temperature"] > 0 and o.result == "ok")
        temperature = {"min": max(floor or 0.0, working[0] if working else 0.01)}
    if floor is not None or not zero_works:
        rules["temperature"] = temperature
    if "top_p=0" in seen and _failed(seen["top_p=0"]):
        rules["top_p"] = {"min": 0.01}
    drop = []
    for param, check in (("top_k", "top_k=1"), ("seed", "seed=1234 (1st)"), ("logprobs", "logprobs"),
                         ("n", "n=2"), ("response_format", "response_format json_object")):
        if result(check) == "rejected":
            drop.append(param)
    if "top_k" in drop and rules["greedy_as"] == "top_k_one":
        rules["greedy_as"] = "temperature_zero"
    if drop:
        rules["drop"] = drop
    seeds = [o for o in outcomes if o.check.startswith("seed=")]
    capabilities = {"seeded_determinism": bool(seeds) and all(o.result == "ok" for o in seeds) and len(seeds) == 3,
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


async def probe_and_record(s: Any, row: Any, box: Any, model: str | None, apply: bool, actor: str,
                           in_thread: Any) -> dict[str, Any]:
    """The probe of a channel row (for the admin API and the CLI): run, stored on the channel, and with `apply`
    written as policies through admin.service. `in_thread(fn, *args)` runs the database work off the loop."""
    from admin import service
    from admin.schemas import ChannelOut
    from channels.registry import build
    from relay.catalog import channel_config
    from relay.errors import bad_request

    config = channel_config(row, box)
    if model is not None and model not in config.models:
        raise bad_request(f"The channel does not serve `{model[:200]}`; it serves {', '.join(config.models)}.",
                          "model")
    served = model or config.models[0]
    result = await run_probe(build(config), config.upstream_model(served))
    result["channel_model"] = served
    if "rules" in result:
        result["explain"] = explain_zero(served, result["rules"])
    row = await in_thread(service.record_probe, s, row, result)
    answer = {"channel": ChannelOut.of(row).model_dump(mode="json", exclude={"probe"}), **result}
    if apply:
        if "rules" not in result:
            raise bad_request(f"Nothing to apply: {result.get('error')}", "apply")
        policies = await in_thread(service.apply_probed_rules, s, row, result["rules"], actor)
        answer["applied"] = [{"id": p.id, "model_pattern": p.model_pattern, "version": p.version} for p in policies]
    return answer
