"""One answer's text as its tokens arrive: decoded incrementally (a step decodes a few tokens, not the whole
answer again), cut at the first stop string, and released only once it can no longer become part of a stop
string or of a half-decoded character."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) - 1 for s in stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already released
        # Decoding starts a few tokens back (prefix_offset) so a token's leading space and merged bytes come
        # out as in a whole decode; text is appended once the tokens up to read_offset decode cleanly.
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int, final: bool = False) -> bool:
        """Takes one token (or none, with final=True: the end). True when a stop string ended the text."""
        if token_id >= 0:
            self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix_offset:self._read_offset])
        after = self._decode(self.ids[self._prefix_offset:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            checked = max(len(self.text) - self.holdback, 0)
            self.text += after[len(before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            hits = [i for i in (self.text.find(s, checked) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return True
        return False

    def release(self, finished: bool) -> str:
        """The text that can go to the client now."""
        end = len(self.text) if finished else len(self.text) - self.holdback
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent:end], end
        return delta
