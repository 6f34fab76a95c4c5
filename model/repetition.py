"""A repetition guard for generation: no unit of text repeated three times in a row.

A small model greedy-decoding prose can fall into a loop ("prefixed prefixed prefixed ...").
``LoopGuard.banned(history)`` names the tokens that would complete the third consecutive copy
of a unit of 1..``max_period`` tokens at the end of ``history``; the generator sets their
logits to -inf, so the model says something else. Only units with a letter or a digit count:
runs of whitespace, brackets or ``----`` underlines are left alone. Text that does not loop
gets exactly the same tokens as without the guard (it only ever bans a token that would make
a third copy), which is why it is measured, not tuned (docs/benchmarks.md).

Longer loops (a greedy model writing the same three-line function again and again) are units of
dozens of tokens, beyond what banning one token can break: ``LoopGuard.repeated_block(text)`` sees
text that ends with the same block of lines twice in a row, and the generator stops there
(``finish_reason`` "repeat").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_MAX_PERIOD = 8
COPIES = 3
BLOCK_LINES = 2  # a repeated block has at least this many non-blank lines ...
BLOCK_CHARS = 16  # ... and this many non-space characters


class LoopGuard:
    def __init__(self, tok: Any, max_period: int = DEFAULT_MAX_PERIOD, copies: int = COPIES):
        self.tok, self.max_period, self.copies = tok, max_period, copies
        self._wordy: dict[int, bool] = {}

    def _has_word(self, t: int) -> bool:
        w = self._wordy.get(t)
        if w is None:
            try:
                text = self.tok.decode([t])
            except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode
                text = ""
            w = self._wordy[t] = any(c.isalnum() for c in text)
        return w

    def banned(self, history: Sequence[int]) -> list[int]:
        """Token ids that would complete ``copies`` consecutive copies of a unit at the end."""
        out: list[int] = []
        n = len(history)
        for p in range(1, self.max_period + 1):
            need = self.copies * p - 1  # tokens of history the copies span, besides the new one
            if n < need:
                break
            t = history[-p]  # the only token that can complete another copy of the last p-unit
            tail = [*history[n - need:], t]
            unit = tail[-p:]
            if all(tail[k * p:(k + 1) * p] == unit for k in range(self.copies - 1)) and \
                    any(self._has_word(u) for u in unit) and t not in out:
                out.append(t)
        return out

    @staticmethod
    def repeated_block(text: str) -> bool:
        """True when ``text``'s complete lines end with two copies in a row of a block of at least
        ``BLOCK_LINES`` non-blank lines and ``BLOCK_CHARS`` non-space characters, with a letter or digit."""
        lines = text[: text.rfind("\n") + 1].split("\n")[:-1]
        n = len(lines)
        for k in range(BLOCK_LINES, n // 2 + 1):
            block = lines[n - k:]
            if block != lines[n - 2 * k:n - k]:
                continue
            body = [ln.strip() for ln in block if ln.strip()]
            if len(body) >= BLOCK_LINES and sum(len("".join(ln.split())) for ln in body) >= BLOCK_CHARS \
                    and any(c.isalnum() for ln in body for c in ln):
                return True
        return False
