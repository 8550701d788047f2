"""The worker's own forward pass (backends.decoder) against transformers' on the same weights: left-padded
batches, a cache that grows step by step, rows that join and leave, a shared prefix expanded to many rows.
Random-weight models of each supported family (and one that is not, which goes through transformers)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from backends.decoder import Decoder, TransformersForward, forward_for
from backends.kv_cache import KVCache

SMALL = dict(vocab_size=2500, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SMALL, rope_theta=100000.0, attention_bias=True)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=24)),
}
PROMPTS = [[5, 17, 29, 3, 88, 120], [7, 7, 250], [44, 2, 9, 19, 61, 2200, 13, 90, 1031]]


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[family]().eval()
    for p in model.parameters():  # random init is small: make the logits spread so differences would show
        p.data.normal_(0, 0.2)
    return model


@torch.no_grad()
def _reference(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Every position's logits of one sequence alone, by transformers: [L, V]."""
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", sorted(MODELS))
@torch.no_grad()
def test_padded_batch_and_decode_steps_match_transformers(family):
    model = _model(family)
    forward = forward_for(model)
    assert isinstance(forward, Decoder)
    ids, mask, positions = _left_padded(PROMPTS)
    logits, cache = forward(ids, mask, positions, None, every_position=True)  # [3, W, V]
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(logits[i, -len(p):], _reference(model, p), atol=1e-4, rtol=1e-4)
    sequences = [list(p) for p in PROMPTS]
    for step in range(70):  # past the cache's first capacity: it grows in place of the old buffers
        nxt = [int(t) for t in logits[:, -1].argmax(-1)]
        for seq, token in zip(sequences, nxt, strict=True):
            seq.append(token)
        mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = forward(torch.tensor(nxt)[:, None], mask, positions, cache)
        if step % 23 == 0 or step == 69:
            for i, seq in enumerate(sequences):
                torch.testing.assert_close(logits[i, -1], _reference(model, seq)[-1], atol=1e-4, rtol=1e-4)
    assert cache.length == mask.shape[1]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@torch.no_grad()
def test_rows_leave_join_and_share_a_prefix(family):
    """The engine's cache moves: a row leaves (select drops the columns now padding for all), new rows join
    (stack left-pads both sides), and new rows start from a cached prefix expanded to each of them."""
    model = _model(family)
    forward = forward_for(model)
    prefix = [11, 12, 13, 14, 15]
    one = torch.ones(1, len(prefix), dtype=torch.long)
    _, prefix_kv = forward(torch.tensor([prefix]), one, one.cumsum(-1) - 1, None)
    suffixes = [[40, 41], [50, 51, 52, 53]]
    ids, own, _ = _left_padded(suffixes)
    mask = torch.cat([torch.ones(2, len(prefix), dtype=torch.long), own], dim=1)
    positions = len(prefix) + (own.cumsum(-1) - 1).clamp(min=0)
    logits, joined = forward(ids, mask, positions, prefix_kv.expand(2))
    for i, s in enumerate(suffixes):
        torch.testing.assert_close(logits[i, -1], _reference(model, prefix + s)[-1], atol=1e-4, rtol=1e-4)
    assert prefix_kv.length == len(prefix)  # the cached prefix itself was not written

    ids0, mask0, pos0 = _left_padded(PROMPTS[:2])
    _, batch = forward(ids0, mask0, pos0, None)
    batch = batch.select(torch.tensor([1]), start=0)  # row 0 leaves
    mask0 = mask0[1:]
    start = int((mask0.sum(0) > 0).nonzero()[0])
    batch, mask0 = batch.select(torch.tensor([0]), start), mask0[:, start:]
    both = batch.stack(joined)
    width = both.length
    masks = torch.cat([torch.nn.functional.pad(mask0, (width - mask0.shape[1], 0)),
                       torch.nn.functional.pad(mask, (width - mask.shape[1], 0))])
    seqs = [PROMPTS[1], prefix + suffixes[0], prefix + suffixes[1]]
    tokens = torch.tensor([[3], [4], [5]])
    masks = torch.cat([masks, torch.ones(3, 1, dtype=torch.long)], dim=1)
    positions = torch.tensor([[len(s)] for s in seqs])
    logits, _ = forward(tokens, masks, positions, both)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[i, -1], _reference(model, s + [int(tokens[i])])[-1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_other_architectures_run_through_transformers():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2500, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    forward = forward_for(model)
    assert isinstance(forward, TransformersForward)
    ids, mask, positions = _left_padded(PROMPTS)
    logits, cache = forward(ids, mask, positions, None, every_position=True)
    assert isinstance(cache, KVCache) and cache.length == ids.shape[1]
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(logits[i, -len(p):], _reference(model, p), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")
def test_cpu_weights_are_prepacked_and_the_allocator_keeps_freed_memory():
    """The two CPU speed-ups bench/worker_bench.py measures are in force (the tests above check the packed
    projections' numbers): without them the worker falls back silently to the slower path."""
    from backends.allocator import keep_freed_memory

    forward = forward_for(_model("qwen2"))
    projections = [forward.lm_head] + [p for layer in forward.layers for p in (layer.qkv, layer.out, layer.gate_up,
                                                                               layer.down)]
    assert all(p.packed is not None for p in projections)
    assert keep_freed_memory()  # glibc here
