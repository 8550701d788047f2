"""The policy stage: match the model policy for (model, tenant), then rewrite the request by its rules.

Bounds clamp what the client sent, defaults fill only what it left out (a missing temperature counts as
left out: older ONE API versions drop `temperature: 0`), a temperature below `greedy_below` becomes
greedy in the channel's way, and every change is a rewrite record {param, from, to, rule}."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Protocol
from urllib.parse import quote

from relay.json_check import answer_verdict
from relay.policy_rules import Bound, Rules


@dataclass(frozen=True)
class PolicyInfo:
    id: int
    version: int
    model_pattern: str
    tenant_id: int | None
    priority: int
    rules: Rules

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def specificity(self) -> int:
        return sum(ch not in "*?[]" for ch in self.model_pattern)


@dataclass(frozen=True)
class PolicyOutcome:
    request: dict[str, Any]
    rewrites: list[dict[str, Any]] = field(default_factory=list)
    ref: str | None = None  # "id@version" of the matched policy
    rules: Rules | None = None
    task: str | None = None
    notes: list[dict[str, Any]] = field(default_factory=list)  # rules that matched but were not applied, and why

    def rewrites_header(self) -> str:
        return rewrites_header(self.rewrites)

    def with_value(self, param: str, value: Any, rule: str) -> PolicyOutcome:
        """The same outcome with one more rewrite (made after the policy, e.g. by a quota reservation)."""
        record = {"param": param, "from": self.request.get(param), "to": value, "rule": rule}
        return PolicyOutcome({**self.request, param: value}, self.rewrites + [record], self.ref, self.rules,
                             self.task, self.notes)


_HEADER_LIMIT = 2000  # characters of X-Relay-Rewrites; proxies and clients refuse much longer headers


def rewrites_header(rewrites: list[dict[str, Any]]) -> str:
    """`param:from->to;…` in printable ASCII (field names come from clients: percent-encoded), at most
    _HEADER_LIMIT characters (then `;+N more`; the request log has them all)."""
    if not rewrites:
        return "none"
    parts = [f"{quote(str(r['param'])[:64], safe='_.-')}:{_show(r['from'])}->{_show(r['to'])}" for r in rewrites]
    shown: list[str] = []
    length = 0
    for i, part in enumerate(parts):
        if length + len(part) > _HEADER_LIMIT:
            shown.append(f"+{len(parts) - i} more")
            break
        shown.append(part)
        length += len(part) + 1
    return ";".join(shown)


def _show(value: Any) -> str:
    """ASCII without separators or line breaks, short: it goes into an HTTP header."""
    if value is None:
        return "unset"
    text = value if isinstance(value, int | float) and not isinstance(value, bool) else json.dumps(value)
    return re.sub(r"[^\x20-\x7e]", "?", str(text).replace(";", ","))[:40]


def match(policies: list[PolicyInfo], model: str, tenant_id: int | None) -> PolicyInfo | None:
    """A tenant's policy beats a global one; then the higher priority; then the more specific pattern."""
    found = [p for p in policies if (p.tenant_id is None or p.tenant_id == tenant_id)
             and fnmatchcase(model, p.model_pattern)]
    if not found:
        return None
    return min(found, key=lambda p: (p.tenant_id is None, -p.priority, -p.specificity, p.id))


def detect_task(request: dict[str, Any], header: str | None) -> str:
    metadata = request.get("metadata")
    explicit = header or (metadata.get("task") if isinstance(metadata, dict) else None)
    if isinstance(explicit, str) and explicit.strip():
        return explicit.strip().lower()
    if asks_for_json(request):
        return "json"
    if request.get("tools") or request.get("functions"):
        return "tools"
    return "chat"


class _Rewriter:
    def __init__(self, request: dict[str, Any]) -> None:
        self.request = dict(request)
        self.rewrites: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []

    def set(self, param: str, value: Any, rule: str) -> None:
        before = self.request.get(param)
        if before == value and (param in self.request) == (value is not None):
            return
        if value is None:
            self.request.pop(param, None)
        else:
            self.request[param] = value
        self.rewrites.append({"param": param, "from": before, "to": value, "rule": rule})

    def bound(self, param: str, rule: Bound | None, default: float | None = None, default_rule: str = "") -> None:
        """Clamp a sent value into the bounds, or fill in the default when the client sent none."""
        if rule is None:
            return
        value = self.request.get(param)
        if value is None:
            fill = default if default is not None else rule.default
            if fill is not None:
                self.set(param, fill, default_rule or f"{param}.default")
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            # NaN, inf or a non-number can come from an SDK or a gateway that skipped validation.
            if value == math.inf and rule.max is not None:
                self.set(param, rule.max, f"{param}.max")
            elif value == -math.inf and rule.min is not None:
                self.set(param, rule.min, f"{param}.min")
            else:
                fill = default if default is not None else rule.default
                fallback = next((v for v in (fill, rule.min, rule.max) if v is not None), None)
                self.set(param, fallback, f"{param}.invalid")
            return
        if rule.min is not None and value < rule.min:
            self.set(param, rule.min, f"{param}.min")
        elif rule.max is not None and value > rule.max:
            self.set(param, rule.max, f"{param}.max")


def rewrite(rules: Rules, request: dict[str, Any], task: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    w = _rewrite(rules, request, task)
    return w.request, w.rewrites


def _rewrite(rules: Rules, request: dict[str, Any], task: str) -> _Rewriter:
    w = _Rewriter(request)
    for param in rules.drop:
        if param in w.request:
            w.set(param, None, "drop")
    t = rules.temperature
    if t is not None:
        sent = w.request.get("temperature")
        numeric = isinstance(sent, int | float) and not isinstance(sent, bool) and not math.isnan(sent)
        if numeric and t.greedy_below is not None and sent < t.greedy_below:
            _greedy(w, rules, sent)
        else:
            by_task = t.by_task.get(task)  # type: ignore[call-overload]
            w.bound("temperature", t, by_task, f"temperature.by_task.{task}" if by_task is not None else "")
    w.bound("top_p", rules.top_p)
    greedy_top_k = any(r["rule"] == "greedy_as.top_k_one" for r in w.rewrites)
    if rules.top_k is not None and not greedy_top_k:  # top_k 1 is how this request was made greedy
        k = rules.top_k
        value = w.request.get("top_k")
        if not _is_int(value) or value <= 0:  # unset, invalid, or 0/-1 meaning "off" at vLLM
            if k.default is not None:
                w.set("top_k", k.default, "top_k.default")
        elif k.min is not None and value < k.min:
            w.set("top_k", k.min, "top_k.min")
        elif k.max is not None and value > k.max:
            w.set("top_k", k.max, "top_k.max")
    for param in ("frequency_penalty", "presence_penalty"):
        penalty = getattr(rules, param)
        if penalty is not None and penalty.default is not None and w.request.get(param) is None \
                and not penalty.apply_to_greedy and is_greedy(w.request):
            w.notes.append({"param": param, "rule": f"{param}.default", "applied": False,
                            "why": "the request is greedy and a penalty would change its argmax "
                                   f"(set {param}.apply_to_greedy to add it anyway)"})
            penalty = penalty.model_copy(update={"default": None})  # bounds still hold for a sent value
        w.bound(param, penalty)
    if rules.max_tokens is not None:
        m = rules.max_tokens
        for param in ("max_tokens", "max_completion_tokens"):
            value = w.request.get(param)
            if value is not None and not _is_int(value):
                w.set(param, m.default, f"{param}.invalid")
            elif value is not None and m.max is not None and value > m.max:
                w.set(param, m.max, f"{param}.max")
        fill = m.default if m.default is not None else m.max
        if fill is not None and w.request.get("max_tokens") is None \
                and w.request.get("max_completion_tokens") is None:
            # A cap binds a request that names no limit too: otherwise the upstream's own default (for vLLM,
            # the rest of the context) would apply.
            w.set("max_tokens", fill, "max_tokens.default" if m.default is not None else "max_tokens.max")
    if rules.seed is not None and rules.seed.default is not None and w.request.get("seed") is None:
        w.set("seed", rules.seed.default, "seed.default")
    return w


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _greedy(w: _Rewriter, rules: Rules, sent: float) -> None:
    if rules.greedy_as == "top_k_one":
        # Qwen's own answer to low temperatures: keep a harmless temperature, take the top token.
        t = rules.temperature
        safe = (t.default if t and t.default is not None else None) or (t.min if t and t.min else None) or 1.0
        w.set("temperature", safe, "temperature.greedy_below")
        w.set("top_k", 1, "greedy_as.top_k_one")
    else:
        w.set("temperature", 0, "temperature.greedy_below")


class PolicyFinder(Protocol):
    def match(self, model: str, tenant_id: int | None) -> PolicyInfo | None: ...


def apply_policy(policies: list[PolicyInfo] | PolicyFinder, request: dict[str, Any], tenant_id: int | None,
                 task_header: str | None = None, endpoint: str = "chat") -> PolicyOutcome:
    """`policies`: a list, scanned; or an index (relay.policy_index), which the request path uses."""
    model = request["model"]
    policy = match(policies, model, tenant_id) if isinstance(policies, list) else policies.match(model, tenant_id)
    if policy is None:
        return PolicyOutcome(request)
    if endpoint == "embeddings":  # nothing is sampled: the rules' sampling parameters have nothing to rewrite
        return PolicyOutcome(request, [], policy.ref, policy.rules, "embeddings")
    task = detect_task(request, task_header)
    w = _rewrite(policy.rules, request, task)
    return PolicyOutcome(w.request, w.rewrites, policy.ref, policy.rules, task, w.notes)


def cooler(outcome: PolicyOutcome, attempt: int) -> PolicyOutcome:
    """The JSON-retry rewrite: the same request, `temperature_step` cooler, greedy once it falls below
    `greedy_below` (or to 0)."""
    rules = outcome.rules
    assert rules is not None and rules.json_retry is not None
    t = rules.temperature
    current = outcome.request.get("temperature")
    if current is None:
        current = t.default if t and t.default is not None else 1.0
    target = round(current + rules.json_retry.temperature_step, 6)
    w = _Rewriter(outcome.request)
    floor = max(t.greedy_below or 0, t.min or 0) if t else 0
    if target <= floor or target <= 0:
        _greedy(w, rules, target)  # cooler than the policy allows sampling at: the greedy answer instead
    else:
        w.set("temperature", target, f"json_retry.{attempt}")
    for r in w.rewrites:
        r["rule"] = f"json_retry.{attempt}"
    return PolicyOutcome(w.request, outcome.rewrites + w.rewrites, outcome.ref, rules, outcome.task, outcome.notes)


def is_greedy(request: dict[str, Any]) -> bool:
    return request.get("temperature") == 0 or request.get("top_k") == 1 or request.get("do_sample") is False


def asks_for_json(request: dict[str, Any]) -> bool:
    """`response_format` asks for a JSON answer (json_object or json_schema)."""
    fmt = request.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def wants_json_retry(outcome: PolicyOutcome) -> bool:
    rules = outcome.rules
    return (rules is not None and rules.json_retry is not None and rules.json_retry.attempts > 0
            and asks_for_json(outcome.request))


# One try of a request: its outcome, the answer and whether that answer is good (None: not judged, counts as good).
Try = tuple[PolicyOutcome, dict[str, Any], bool | None]


async def json_retry(outcome: PolicyOutcome, response: dict[str, Any],
                     ask: Callable[[PolicyOutcome], Awaitable[dict[str, Any]]],
                     tried: Callable[[Try], None] = lambda _: None) -> list[Try]:
    """response_format asks for JSON and the policy retries: while the answer does not parse (or match the
    json_schema), ask again `temperature_step` cooler, down to greedy. Returns every try in order (each one was
    paid for), each also handed to `tried` as soon as it is judged (a later try may fail)."""
    retry = outcome.rules.json_retry  # type: ignore[union-attr]
    tries: list[Try] = []
    while True:
        tries.append((outcome, response, await answer_verdict(response, outcome.request)))
        tried(tries[-1])
        if tries[-1][2] is not False or len(tries) > retry.attempts or is_greedy(outcome.request):
            return tries
        outcome = cooler(outcome, len(tries))
        response = await ask(outcome)
