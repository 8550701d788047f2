"""The worker's sampler, in fp32. It cannot raise "probability tensor contains either inf, nan or
element < 0": logits are sanitised, scaled after subtracting the row maximum (so a tiny temperature
cannot overflow), and every row keeps at least one candidate before torch.multinomial.

Shapes: logits [B, V] float32, one SamplingParams and one torch.Generator per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_TEMPERATURE = 1e-5  # at or below this, sampling is argmax (OpenAI's temperature 0 means greedy)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    do_sample: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's logit_bias: (token id, bias in [-100, 100])

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= GREEDY_TEMPERATURE


@dataclass
class SamplerStats:
    nonfinite_rows: int = 0  # rows whose logits held NaN or inf before sanitising


def sanitise(logits: torch.Tensor, stats: SamplerStats | None = None) -> torch.Tensor:
    """NaN → -inf, +inf → the largest finite float; a row left with no finite value becomes uniform."""
    finite = torch.isfinite(logits)  # [B, V] bool
    if bool(finite.all()):
        return logits
    if stats is not None:
        stats.nonfinite_rows += int((~finite).any(dim=-1).sum())
    big = torch.finfo(logits.dtype).max
    logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=big, neginf=float("-inf"))
    dead = ~torch.isfinite(logits).any(dim=-1, keepdim=True)  # [B, 1]
    return torch.where(dead, torch.zeros_like(logits), logits)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor,
                    params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over generated tokens (counts [B, V] fp32) and the
    HF/vLLM repetition penalty over prompt and generated tokens (seen [B, V] bool)."""
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=logits.device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=logits.device)[:, None]
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=logits.device)[:, None]
    logits = logits - freq * counts - pres * (counts > 0).to(logits.dtype)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    return torch.where(seen & (rep != 1.0), penalised, logits)


def filter_row(scaled: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """top_k, top_p, min_p on one row of temperature-scaled logits [V]; the best token always survives."""
    if p.top_k > 0 and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass before it already reaches top_p (so top_p = 0 keeps exactly one)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        drop_sorted[0] = False
        scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if p.min_p > 0.0:
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return scaled


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           counts: torch.Tensor, seen: torch.Tensor, stats: SamplerStats | None = None) -> torch.Tensor:
    """Next token per row: [B] int64. Penalties, biases and filters cost [V]-wide passes: only the rows that
    asked for them pay them, and all greedy rows share one argmax."""
    logits = sanitise(logits.float(), stats)
    penalised = [i for i, p in enumerate(params)
                 if p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1.0]
    if penalised:
        index = torch.tensor(penalised, dtype=torch.long, device=logits.device)
        logits[index] = apply_penalties(logits[index], counts[index], seen[index], [params[i] for i in penalised])
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=logits.device)
            logits[i, ids] += torch.tensor([b for _, b in p.logit_bias], dtype=logits.dtype, device=logits.device)
    if penalised or any(p.logit_bias for p in params):
        # Penalties and biases can push a repaired extreme back to inf (a repetition penalty < 1 on the
        # largest float) or to NaN (-inf * 0): repair again, uncounted, right before sampling.
        logits = sanitise(logits)
    out = torch.argmax(logits, dim=-1)  # [B]: the greedy rows' answer, replaced below for sampled rows
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i]
        # Subtract the maximum first: (x - max) / T is <= 0, so no temperature can overflow it.
        scaled = filter_row((row - row.max()) / p.temperature, p)
        probs = torch.softmax(scaled, dim=-1)
        out[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return out


def logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the model's raw distribution (before penalties, temperature and filters,
    as vLLM reports them), with -inf clamped to the most negative finite float for JSON. [B, V]."""
    lp = torch.log_softmax(sanitise(logits.float()), dim=-1)
    return torch.clamp(lp, min=torch.finfo(torch.float32).min)
