"""The batch's KV cache: per layer keys and values [B, H, capacity, D] of which the first `length` columns are
in use. Rows are left-padded (the engine's attention mask [B, length] says which columns are padding), so a
decode step writes one column for every row at the same index — no per-step concatenation: capacity grows
in chunks and is reallocated only when it runs out, when rows join, or when rows leave."""

from __future__ import annotations

import torch

GROWTH = 64  # columns added when the capacity runs out; fewer reallocations, at most this many spare columns


class KVCache:
    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], spare: int = GROWTH) -> None:
        """From per-layer keys/values [B, H, T, D]: copied into buffers with `spare` free columns, or with
        spare=0 taken as they are (they must not be views that others write)."""
        self.length = layers[0][0].shape[2] if layers else 0
        self.keys: list[torch.Tensor] = [k for k, _ in layers] if spare == 0 else []
        self.values: list[torch.Tensor] = [v for _, v in layers] if spare == 0 else []
        for k, v in layers if spare else ():
            self.keys.append(_with_capacity(k, self.length + spare))
            self.values.append(_with_capacity(v, self.length + spare))

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer the columns in use, [B, H, length, D] (views)."""
        return [(k[:, :, :self.length], v[:, :, :self.length]) for k, v in zip(self.keys, self.values, strict=True)]

    def reserve(self, columns: int) -> None:
        """Makes room for `columns` more before a forward writes them (layer by layer, with write())."""
        capacity = self.keys[0].shape[2] if self.keys else 0
        if self.length + columns > capacity:
            size = self.length + columns + GROWTH
            self.keys = [_with_capacity(k[:, :, :self.length], size) for k in self.keys]
            self.values = [_with_capacity(v[:, :, :self.length], size) for v in self.values]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores a layer's new columns [B, H, S, D] after the used ones and returns the layer's keys and values
        including them, [B, H, length + S, D]. The length itself moves on in advance() once every layer wrote."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, columns: int) -> None:
        self.length += columns

    def head(self, columns: int) -> KVCache:
        """The first `columns` columns (of a one-row prefix: the KV of a shorter prefix), copied."""
        return KVCache([(k[:, :, :columns], v[:, :, :columns]) for k, v in self.layers()])

    def expand(self, rows: int) -> KVCache:
        """One row's cache (a shared prompt prefix) repeated for `rows` rows."""
        return KVCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.layers()])

    def select(self, index: torch.Tensor, start: int) -> KVCache:
        """The rows in `index`, without the first `start` columns (padding for all of them). One copy; the
        buffers keep their spare columns (and the dropped ones stay allocated until the next reallocation)."""
        out = KVCache([])
        out.length = self.length - start
        out.keys = [k.index_select(0, index)[:, :, start:] for k in self.keys]
        out.values = [v.index_select(0, index)[:, :, start:] for v in self.values]
        return out

    def stack(self, other: KVCache) -> KVCache:
        """This batch's rows then other's, both left-padded to the longer length (one copy into new buffers)."""
        width = max(self.length, other.length)
        out = KVCache([])
        out.length = width
        for layer in range(len(self.keys)):
            for mine, theirs, into in ((self.keys[layer], other.keys[layer], out.keys),
                                       (self.values[layer], other.values[layer], out.values)):
                b0, b1 = mine.shape[0], theirs.shape[0]
                buf = mine.new_zeros(b0 + b1, mine.shape[1], width + GROWTH, mine.shape[3])
                buf[:b0, :, width - self.length:width] = mine[:, :, :self.length]
                buf[b0:, :, width - other.length:width] = theirs[:, :, :other.length]
                into.append(buf)
        return out


def _with_capacity(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, H, T, D] → a new [B, H, capacity, D] buffer whose first T columns are t."""
    out = t.new_empty(t.shape[0], t.shape[1], capacity, t.shape[3])
    out[:, :, :t.shape[2]] = t
    return out
