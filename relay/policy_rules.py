"""The one validated schema of a model policy's rules, and the presets shipped with the product."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["json", "tools", "code", "chat", "creative", "summary", "translation"]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Bound(_Rule):
    """Bounds clamp what the client sent; the default fills what it left out."""

    min: float | None = None
    max: float | None = None
    default: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Bound:
        for name in ("min", "max", "default"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not exceed max")
        if self.default is not None and not self.contains(self.default):
            raise ValueError("default must lie within min and max")
        return self

    def contains(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Adaptive(_Rule):
    """Opt-in: the relay moves by_task[task] itself, one audited `step` at a time within min and max, toward the
    warmest temperature whose JSON answers are valid at least `target_validity` of the time — down when the
    current temperature has `min_sample` judged answers and falls short, up when the next warmer one has as
    many and meets the target (admin.adaptive)."""

    task: Task
    target_validity: float = Field(gt=0, le=1)
    min_sample: int = Field(default=200, ge=5, le=1_000_000)
    step: float = Field(default=0.1, ge=0.05, le=0.5)


class TemperatureRule(Bound):
    min: float | None = Field(default=None, ge=0, le=2)
    max: float | None = Field(default=None, ge=0, le=2)
    default: float | None = Field(default=None, ge=0, le=2)
    greedy_below: float | None = Field(default=None, ge=0, le=2)  # a temperature below this means greedy
    by_task: dict[Task, float] = Field(default_factory=dict)  # defaults per task, within the bounds
    adaptive: Adaptive | None = None

    @model_validator(mode="after")
    def _tasks_in_bounds(self) -> TemperatureRule:
        for task, value in self.by_task.items():
            if not (math.isfinite(value) and 0 <= value <= 2 and self.contains(value)):
                raise ValueError(f"by_task.{task} must lie within min and max (and 0..2)")
        if self.adaptive is not None and self.task_default(self.adaptive.task) is None:
            raise ValueError(f"adaptive needs a temperature to start from: set by_task.{self.adaptive.task} "
                             "or default")
        return self

    def task_default(self, task: str) -> float | None:
        """The temperature a request of this task gets when it sends none."""
        value = self.by_task.get(task)  # type: ignore[call-overload]
        return value if value is not None else self.default


class TopPRule(Bound):
    min: float | None = Field(default=None, gt=0, le=1)
    max: float | None = Field(default=None, gt=0, le=1)
    default: float | None = Field(default=None, gt=0, le=1)


class PenaltyRule(Bound):
    min: float | None = Field(default=None, ge=-2, le=2)
    max: float | None = Field(default=None, ge=-2, le=2)
    default: float | None = Field(default=None, ge=-2, le=2)
    # A penalty changes which token is the likeliest, so by default it is not added to a greedy request (an
    # evaluation or a cached answer asked for the argmax); true adds it there too.
    apply_to_greedy: bool = False


class _IntBound(_Rule):
    @model_validator(mode="after")
    def _consistent(self):
        lo, hi, default = getattr(self, "min", None), self.max, self.default
        if lo is not None and hi is not None and lo > hi:
            raise ValueError("min must not exceed max")
        if default is not None and ((lo is not None and default < lo) or (hi is not None and default > hi)):
            raise ValueError("default must lie within min and max")
        return self


class TopKRule(_IntBound):
    min: int | None = Field(default=None, ge=1)
    max: int | None = Field(default=None, ge=1)
    default: int | None = Field(default=None, ge=1)


class MaxTokensRule(_IntBound):
    max: int | None = Field(default=None, ge=1)
    default: int | None = Field(default=None, ge=1)


class SeedRule(_Rule):
    default: int | None = None


class JsonRetry(_Rule):
    attempts: int = Field(default=0, ge=0, le=5)  # extra attempts after a malformed JSON answer
    temperature_step: float = Field(default=-0.2, ge=-2, lt=0)  # each retry runs this much cooler


class CacheRule(_Rule):
    mode: Literal["off", "deterministic", "always"] = "deterministic"
    ttl_s: int = Field(default=3600, ge=1, le=30 * 86400)
    namespace: str | None = Field(default=None, max_length=100)  # shared on purpose; default: per tenant


class Rules(_Rule):
    temperature: TemperatureRule | None = None
    greedy_as: Literal["temperature_zero", "top_k_one"] = "temperature_zero"
    top_p: TopPRule | None = None
    top_k: TopKRule | None = None
    frequency_penalty: PenaltyRule | None = None
    presence_penalty: PenaltyRule | None = None
    max_tokens: MaxTokensRule | None = None
    seed: SeedRule | None = None
    drop: list[str] = Field(default_factory=list)  # parameters the model's channels cannot take
    json_retry: JsonRetry | None = None
    cache: CacheRule | None = None

    @field_validator("drop")
    @classmethod
    def _droppable(cls, params: list[str]) -> list[str]:
        essential = {"model", "messages", "prompt", "stream"} & set(params)
        if essential:
            raise ValueError(f"{', '.join(sorted(essential))} cannot be dropped")
        return params


def with_task_default(rules: dict, task: str, value: float) -> dict:
    """Stored rules (a policy row's JSON) with temperature.by_task[task] set to `value`, the rest as it was."""
    temperature = dict(rules.get("temperature") or {})
    temperature["by_task"] = {**(temperature.get("by_task") or {}), task: value}
    return {**rules, "temperature": temperature}


PRESETS: dict[str, dict] = {
    # Qwen1.5 crashes sampling below ~0.5 (reference article 000): floor it, and let 0 mean greedy the way
    # Qwen's own openai_api.py does it (top_k=1), which never divides by a tiny temperature.
    "qwen1.5": {
        "temperature": {"min": 0.5, "max": 2.0, "greedy_below": 0.01, "default": 0.7},
        "greedy_as": "top_k_one",
        "top_p": {"min": 0.01, "max": 1.0},
        "json_retry": {"attempts": 2, "temperature_step": -0.2},
    },
    # Qwen2.5-7B-Instruct's task table (reference article 003), as defaults: the middle of each range.
    "qwen2.5": {
        "temperature": {"greedy_below": 0.01, "by_task": {"json": 0.4, "tools": 0.4, "code": 0.6, "chat": 0.8,
                                                          "creative": 1.0, "summary": 0.6, "translation": 0.6},
                        "default": 0.8},
        "top_p": {"min": 0.01, "default": 0.95},
        "frequency_penalty": {"default": 0.4},
        "presence_penalty": {"default": 0.3},
        "json_retry": {"attempts": 2, "temperature_step": -0.2},
    },
    # Any model: nothing can reach a sampler as a degenerate value.
    "safe-default": {
        "temperature": {"greedy_below": 0.01, "max": 1.5},
        "top_p": {"min": 0.01},
        "max_tokens": {"max": 8192},
    },
}

# Every preset is itself valid (fails at import otherwise).
_ = {name: Rules.model_validate(rules) for name, rules in PRESETS.items()}
