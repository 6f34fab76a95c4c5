"""The model's task formats: one place that turns task inputs into token ids.

Used by training-data generation (``model.data``) and by the assistant at run time,
so both always agree. Special tokens are sentencepiece *control* symbols: they are
never produced by encoding text, only inserted here by id.

    completion  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> -> middle <eos>
                (SPM variant: <fim_suffix> suffix <fim_prefix> prefix <fim_middle> ...)
    comment     <comment> code <think> -> reasoning </think> docstring <eos>
    debug       <debug> numbered code <think> -> reasoning </think> finding <eos>
    explain     <explain> code <think> -> reasoning </think> explanation <eos>

A debug finding is either the exact text ``no issue`` or::

    line N: hint
    fix: replacement line (stripped of indentation)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Names -> the token text used in the sentencepiece model.
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<|pad|>",
    "eos": "<|endoftext|>",
    "fim_prefix": "<|fim_prefix|>",
    "fim_suffix": "<|fim_suffix|>",
    "fim_middle": "<|fim_middle|>",
    "file_sep": "<|file_sep|>",
    "think": "<|think|>",
    "think_end": "<|/think|>",
    "comment": "<|comment|>",
    "debug": "<|debug|>",
    "explain": "<|explain|>",
}

NO_ISSUE = "no issue"


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def special_id(self, name: str) -> int: ...


def number_lines(code: str, start: int = 1) -> str:
    """Prefix each line with its 1-based number: ``"12| x = 1"``."""
    lines = code.split("\n")
    return "\n".join(f"{i}| {line}" for i, line in enumerate(lines, start))


def fim_prompt(tok: TokenizerLike, prefix: str, suffix: str, spm: bool = True) -> list[int]:
    """The completion prompt; the model writes the middle after it.

    SPM (suffix first, the prefix right before the middle) is the default at inference:
    the shipped model predicts a held-out line at -1.89 nats/token in SPM order against
    -3.10 in PSM order (16 held-out lines), because its training rows often cut a PSM
    example so the middle did not see its prefix (see docs/model-card.md).
    """
    p, s, m = tok.special_id("fim_prefix"), tok.special_id("fim_suffix"), tok.special_id("fim_middle")
    if spm:
        return [s, *tok.encode(suffix), p, *tok.encode(prefix), m]
    return [p, *tok.encode(prefix), s, *tok.encode(suffix), m]


def fim_suffix_stop(suffix: str, min_chars: int = 4) -> str | None:
    """A stop string for fill-in-the-middle: the suffix's first line after the cursor's line
    with at least ``min_chars`` visible characters, as ``"\n" + line``. A model that does not
    end the middle with ``<eos>`` goes on to write the suffix; this stops it at the suffix."""
    for line in suffix.split("\n")[1:]:
        if len(line.strip()) >= min_chars:
            return "\n" + line.rstrip()
    return None


def task_prompt(tok: TokenizerLike, task: str, code: str) -> list[int]:
    """Prompt for ``comment``, ``debug`` or ``explain``; ends with <think>.

    For ``debug`` the caller passes already-numbered code (see ``number_lines``).
    """
    if task not in ("comment", "debug", "explain"):
        raise ValueError(f"unknown task {task!r}")
    return [tok.special_id(task), *tok.encode(code), tok.special_id("think")]


def task_example(tok: TokenizerLike, task: str, code: str, reasoning: str, answer: str) -> tuple[list[int], int]:
    """A full training example and the index where the target (reasoning) starts."""
    prompt = task_prompt(tok, task, code)
    target = [*tok.encode(reasoning), tok.special_id("think_end"), *tok.encode(answer), tok.special_id("eos")]
    return prompt + target, len(prompt)


def fim_example(tok: TokenizerLike, prefix: str, middle: str, suffix: str, spm: bool = False) -> list[int]:
    return [*fim_prompt(tok, prefix, suffix, spm), *tok.encode(middle), tok.special_id("eos")]


@dataclass(frozen=True)
class Finding:
    line: int
    hint: str
    fix: str | None = None


_FINDING = re.compile(r"^\s*line\s+(\d+)\s*:\s*(.*?)\s*$", re.IGNORECASE)
_FIX = re.compile(r"^\s*fix\s*:\s?(.*?)\s*$", re.IGNORECASE)


def format_finding(f: Finding | None) -> str:
    if f is None:
        return NO_ISSUE
    text = f"line {f.line}: {f.hint}"
    if f.fix is not None:
        text += f"\nfix: {f.fix.strip()}"
    return text


_LOOSE_FINDING = re.compile(r"line\s+(\d+)\s*:\s*(.+)", re.IGNORECASE)
_LOOSE_FIX = re.compile(r"^\s*fix\s*:\s?(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def parse_finding(text: str, loose: bool = False) -> Finding | None:
    """Parse a debug answer. ``None`` means "no issue"; raises ValueError if neither.

    The one parser of debug answers (training data, the product, the eval). Strict: the
    answer is exactly :func:`format_finding`'s shape. ``loose`` (what the product accepts
    from a small model): failing that, the first ``line N: hint`` anywhere, and a ``fix:``
    line after it.
    """
    stripped = text.strip()
    if stripped.lower().startswith(NO_ISSUE):
        return None
    lines = stripped.splitlines()
    m = _FINDING.match(lines[0]) if lines else None
    if m is None:
        lm = _LOOSE_FINDING.search(text) if loose else None
        if lm is None:
            raise ValueError(f"not a finding: {lines[0]!r}" if lines else "empty debug answer")
        fm = _LOOSE_FIX.search(text[lm.end():])
        return Finding(int(lm.group(1)), lm.group(2).strip(), fm.group(1) if fm else None)
    fix = None
    for extra in lines[1:]:
        fm = _FIX.match(extra)
        if fm:
            fix = fm.group(1)
            break
    return Finding(int(m.group(1)), m.group(2), fix)


def is_task_function(enclosing: Sequence[str]) -> bool:
    """Which functions the tasks (comment, debug) are trained on and run for: module-level
    functions and methods of (nested) classes, never a function nested in a function (it is
    part of its parent's code). ``enclosing`` are the kinds (``"class"``/``"function"``) of
    the scopes around the function, outermost first; blocks (``if``, ``try``...) are not
    scopes. The one definition: ``model.data.tasks`` (ast) and ``assistant.code``
    (tree-sitter) both ask this."""
    return "function" not in enclosing
