"""The model's forward pass for the engine. For the Llama / Qwen2 / Qwen3 family it is written out here over
the transformers model's own weights (nanoGPT-style): q/k/v and gate/up are fused into one matmul each,
keys and values go straight into the preallocated KVCache, attention is one SDPA call with grouped heads, and
on a CPU every projection's weight is prepacked for oneDNN (Projection). A padded prefill runs its projections
on real tokens only. That removes most of the per-layer overhead of the generic implementation, which on a CPU
costs as much as the arithmetic at small batch sizes. Any other architecture runs through transformers itself.

Shapes: B rows, S new tokens per row, T cached columns, E hidden, H / Hkv query / key-value heads, D head
dim, F MLP width, V vocabulary."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812  (the usual alias)
from transformers import DynamicCache

from backends.kv_cache import KVCache

FAMILIES = ("llama", "qwen2", "qwen3")
PACK_ROWS = 16  # the batch size oneDNN lays packed weights out for (any row count works)


class Projection:
    """x [..., In] → x Wᵀ + b [..., Out] for a weight W [Out, In]. On a CPU with oneDNN, W is also kept packed
    in oneDNN's blocked layout, as torch.compile's freezing does, so a call no longer re-packs the weight:
    at decode batch sizes that is 1.3-2.5× faster per projection (the output layer gains most; measured on
    this machine's 2-core EPYC, AVX2). The dense W stays: the transformers model shares it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self.packed: torch.Tensor | None = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
            with contextlib.suppress(RuntimeError):  # a build without this op keeps the plain path
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@dataclass
class _Layer:
    norm_in: torch.Tensor  # [E]
    qkv: Projection  # [(H + 2 Hkv) D, E], with Qwen2's bias
    q_norm: torch.Tensor | None  # [D] (Qwen3 normalises each head's queries and keys)
    k_norm: torch.Tensor | None  # [D]
    out: Projection  # [E, H D]
    norm_post: torch.Tensor  # [E]
    gate_up: Projection  # [2 F, E]
    down: Projection  # [E, F]


def _fused(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight for several projections of the same input. The modules' own weights become views of it, so
    the model keeps working (tests compare against it) and no weight is held twice."""
    weight = torch.cat([lin.weight.data for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = torch.cat([b.data for b in biases]) if all(b is not None for b in biases) else None
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[row:row + rows]
        if bias is not None:
            lin.bias.data = bias[row:row + rows]
        row += rows
    return weight, bias


def _layer(block: torch.nn.Module) -> _Layer:
    attn, mlp = block.self_attn, block.mlp
    qkv, qkv_bias = _fused(attn.q_proj, attn.k_proj, attn.v_proj)
    gate_up, _ = _fused(mlp.gate_proj, mlp.up_proj)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return _Layer(block.input_layernorm.weight, Projection(qkv, qkv_bias),
                  q_norm.weight if q_norm is not None else None, k_norm.weight if k_norm is not None else None,
                  Projection(attn.o_proj.weight, attn.o_proj.bias), block.post_attention_layernorm.weight,
                  Projection(gate_up), Projection(mlp.down_proj.weight))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [B, H, S, D] with cos/sin [B, 1, S, D] (the half-split layout of these models)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Decoder:
    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        body = model.model
        self.embed = body.embed_tokens.weight  # [V, E]
        self.rotary = body.rotary_emb  # transformers' own: every rope scaling variant it knows
        self.norm = body.norm.weight  # [E]
        self.lm_head = Projection(model.lm_head.weight)  # [V, E] (the embedding itself when tied)
        self.layers = [_layer(block) for block in body.layers]

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # in fp32 whatever the model's dtype, as transformers does
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _attention(self, i: int, layer: _Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   allowed: torch.Tensor, cache: KVCache, real: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, E], or [N, E] for the real tokens of a padded prefill (real [B, S] says where they sit)."""
        b, s = allowed.shape[0], cos.shape[2]
        qkv = layer.qkv(x)  # [B, S or N, (H + 2 Hkv) D]
        if real is not None:  # into the padded layout; padding gets zero keys and values, masked anyway
            padded = qkv.new_zeros(b, s, qkv.shape[-1])
            padded[real] = qkv
            qkv = padded
        qkv = qkv.view(b, s, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.transpose(1, 2).split([self.heads, self.kv_heads, self.kv_heads], dim=1)  # [B, H*, S, D]
        if layer.q_norm is not None:
            q, k = self._rms(q, layer.q_norm), self._rms(k, layer.k_norm)
        keys, values = cache.write(i, _rotate(k, cos, sin), v)  # [B, Hkv, T + S, D]
        att = F.scaled_dot_product_attention(_rotate(q, cos, sin), keys, values, attn_mask=allowed,
                                             enable_gqa=True)  # [B, H, S, D]
        att = att.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return layer.out(att if real is None else att[real])

    @staticmethod
    def _mlp(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(x).chunk(2, dim=-1)  # [B, S, F] each
        return layer.down(F.silu(gate) * up)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                 every_position: bool = False) -> tuple[torch.Tensor, KVCache]:
        """ids/positions [B, S]; mask [B, T + S] (0 on padding). Logits [B, S or 1, V] fp32 and the cache."""
        b, s = ids.shape
        x = F.embedding(ids, self.embed)  # [B, S, E]
        if cache is None:
            cache = KVCache([(x.new_empty(b, self.kv_heads, 0, self.head_dim),) * 2 for _ in self.layers])
        cos, sin = self.rotary(x, positions)  # [B, S, D] each
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, D]
        total = cache.length + s
        # key j is visible to new token i when it is not padding and not after it; every token sees itself,
        # so a padding query row is never empty (an empty row is NaN, and NaN times a zero weight stays NaN)
        allowed = mask.bool()[:, None, None, :]  # [B, 1, 1, T + S]
        if s > 1:  # (a decode step's one new token is never padding and sees every cached column)
            column = torch.arange(total, device=ids.device)[None, :]
            own = torch.arange(s, device=ids.device)[:, None] + cache.length  # [S, 1]: each new token's column
            allowed = (allowed & (column <= own)) | (column == own)  # [B, 1, S, T + S]
        # Norms, projections and the MLP treat each token alone, so a prefill of uneven prompts runs them on its
        # real tokens only, [N, E]: only attention needs the padded [B, S] layout.
        real = mask[:, -s:].bool() if s > 1 else None  # [B, S]
        if real is not None and bool(real.all()):
            real = None
        if real is not None:
            x = x[real]  # [N, E]
        cache.reserve(s)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, self._rms(x, layer.norm_in), cos, sin, allowed, cache, real)
            x = x + self._mlp(layer, self._rms(x, layer.norm_post))
        cache.advance(s)
        if real is not None:  # back to [B, S, E]; a row's last column is always its own (left padding)
            padded = x.new_zeros(b, s, x.shape[-1])
            padded[real] = x
            x = padded
        x = x if every_position else x[:, -1:]
        return self.lm_head(self._rms(x, self.norm)).float(), cache  # [B, S or 1, V]


class TransformersForward:
    """Any other causal LM, through transformers (its cache rebuilt around ours each call)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                 every_position: bool = False) -> tuple[torch.Tensor, KVCache]:
        past = DynamicCache(ddp_cache_data=cache.layers()) if cache is not None and cache.length else DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                         use_cache=True, logits_to_keep=0 if every_position else 1)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits.float(), KVCache(layers, spare=0)


def forward_for(model: torch.nn.Module) -> Decoder | TransformersForward:
    cfg = model.config
    plain = (cfg.model_type in FAMILIES and getattr(cfg, "hidden_act", "silu") == "silu"
             and not getattr(cfg, "use_sliding_window", False) and not getattr(cfg, "mlp_bias", False))
    return Decoder(model) if plain else TransformersForward(model)
