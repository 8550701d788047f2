"""The raw bytes of every token: what OpenAI's `logprobs[].bytes` reports (a byte-fallback token is one byte
of a multi-byte character, not U+FFFD), and what the grammar's closing mode reads to tell closing tokens.

Byte-level BPE vocabularies (GPT-2, Qwen, SmolLM2) spell bytes with printable stand-ins; SentencePiece ones
name single bytes `<0xNN>` and spaces `▁`. Built once per model: [V] entries."""

from __future__ import annotations

import re
from functools import cached_property

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, reversed."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    stand_ins, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, stand_ins, strict=True)}


class Vocab:
    def __init__(self, tokenizer, size: int) -> None:
        self.tokenizer = tokenizer
        self.size = size  # the model's output size (may exceed the tokenizer's: padding rows)

    @cached_property
    def raw(self) -> list[bytes]:
        decoder = _byte_decoder()
        names = self.tokenizer.convert_ids_to_tokens(list(range(min(self.size, len(self.tokenizer)))))
        out = []
        for token_id, name in enumerate(names):
            if name is None:
                out.append(b"")
            elif all(ch in decoder for ch in name):
                out.append(bytes(decoder[ch] for ch in name))
            elif match := _BYTE_TOKEN.match(name):
                out.append(bytes([int(match.group(1), 16)]))
            elif name.startswith("<") and name.endswith(">") and token_id in self.tokenizer.all_special_ids:
                out.append(name.encode())
            else:
                out.append(name.replace("\u2581", " ").encode())
        return out + [b""] * (self.size - len(out))

    def bytes_of(self, token_id: int) -> bytes:
        return self.raw[token_id] if 0 <= token_id < self.size else b""
