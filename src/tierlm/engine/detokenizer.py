"""Incremental detokenization and stop-string matching for one sequence.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so each step decodes a short
window (prefix_offset..end) and emits only the text beyond the window's already-emitted part, and
only once it no longer ends in U+FFFD. Cost per step is O(window), not O(output).
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars held back while streaming
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> str | None:
        """Add one token; returns the stop string if one now appears in the text (text is cut there)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            old_len = len(self.text)
            self.text += delta
            return self._check_stop(old_len)
        return None

    def _check_stop(self, old_len: int) -> str | None:
        for s in self.stop:
            i = self.text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
                return s
        return None

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: while running, hold back a possible partial stop string at the end."""
        if finished or not self.hold:
            return self.text
        return self.text[: max(0, len(self.text) - self.hold)]
