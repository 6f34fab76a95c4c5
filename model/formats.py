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


class _Scan:
    """Python's bracket depth and string state over text fed in pieces (enough to tell whether a
    newline ends a statement; no parser: ``model`` parses no code)."""

    def __init__(self) -> None:
        self.depth, self.quote, self.comment, self.escape = 0, "", False, False

    def feed(self, text: str, on_newline=None) -> int | None:
        """Scan ``text``; ``on_newline(i)`` is asked at each newline that ends a logical line
        (outside brackets and strings, not after a backslash) and may stop the scan: then the
        index of that newline, else None."""
        i = 0
        while i < len(text):
            c = text[i]
            if self.escape:
                self.escape = False
            elif self.comment:
                if c == "\n":
                    self.comment = False
                    continue  # the newline itself is seen below
            elif self.quote:
                if c == "\\":
                    self.escape = True
                elif text.startswith(self.quote, i):
                    i += len(self.quote)
                    self.quote = ""
                    continue
                elif c == "\n" and len(self.quote) == 1:
                    self.quote = ""  # an unterminated one-line string ends with its line
            elif c in "\"'":
                self.quote = c * 3 if text.startswith(c * 3, i) else c
                i += len(self.quote)
                continue
            elif c == "#":
                self.comment = True
            elif c == "\\":
                self.escape = True  # a line continuation
            elif c in "([{":
                self.depth += 1
            elif c in ")]}":
                self.depth -= 1
            elif c == "\n" and self.depth <= 0 and on_newline is not None and on_newline(i):
                return i
            i += 1
        return None


class FimEnd:
    """Where a fill-in-the-middle answer ends, for a model that writes neither ``<eos>`` nor the
    suffix (``fim_suffix_stop``) after the middle. From the text around the cursor:

    * cursor inside a line whose rest is empty in the file (or only closing brackets), the line
      no block header (``...:``): the middle is the rest of that line and ends at its first
      newline outside brackets and strings (brackets the prefix's line leaves open and the
      suffix's line does not close count: after ``x = foo(`` it may take several lines);
    * cursor on a line of only indentation, outside brackets: the middle ends before the first
      line indented less than the cursor (the block ended);
    * otherwise (a block header, column 0, inside brackets): only ``<eos>`` and the suffix end it.

    ``push(text)`` returns ``(text to show, ended)``; a line's indentation is held back until
    its first character shows whether the line still belongs to the middle."""

    def __init__(self, prefix: str, suffix: str):
        line = prefix.rsplit("\n", 1)[-1]
        after = suffix.split("\n", 1)[0]
        self.one_line = bool(line.strip()) and not line.rstrip().endswith(":") and \
            all(c in ")]}:;, \t\r" for c in after)
        self.scan = _Scan()
        if self.one_line:
            self.scan.feed(line)
            self.scan.depth -= sum(after.count(c) for c in ")]}")
        before = _Scan()
        before.feed("\n".join(prefix.split("\n")[-50:]))
        inside = before.depth > 0 or len(before.quote) == 3
        self.indent = len(line) if not line.strip() and not inside else 0
        self.text = ""  # the middle so far
        self.shown = 0  # how much of it push() returned
        self.judged = 0  # newlines before this index have been judged (indentation rule)
        self.fed = 0  # the one-line rule's scan has seen the text before this index
        self.ended = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.ended:
            return "", True
        self.text += piece
        if self.one_line:
            data = self.text[self.fed:]
            run = len(data) - len(data.rstrip("\"'"))
            upto = len(data) - run if 0 < run < 3 else len(data)  # `"` + `""` may be one `"""`
            cut = self.scan.feed(data[:upto], lambda i: True)
            if cut is not None:
                return self._show(self.fed + cut, True)
            self.fed += upto
            return self._show(len(self.text), False)
        if self.indent > 0:
            while (nl := self.text.find("\n", self.judged)) >= 0:
                nxt = self.text[nl + 1:].split("\n", 1)
                if len(nxt) == 1 and not nxt[0].strip():
                    break  # the next line's first character is not in yet
                self.judged = nl + 1
                line = nxt[0]
                if line.strip() and len(line) - len(line.lstrip()) < self.indent and self._outside(nl):
                    return self._show(len(self.text[:nl].rstrip()), True)
            body = len(self.text.rstrip())
            if "\n" in self.text[body:]:
                return self._show(body, False)  # blank lines and indentation wait for the next line
        return self._show(len(self.text), False)

    def _outside(self, nl: int) -> bool:
        """Whether the newline at ``nl`` lies outside the middle's brackets and strings."""
        return _Scan().feed(self.text[:nl + 1], lambda i: i == nl) == nl

    def _show(self, end: int, ended: bool) -> tuple[str, bool]:
        self.ended = ended
        out = self.text[self.shown:max(end, self.shown)]
        self.shown = max(self.shown, end)
        return out, ended

    def flush(self) -> str:
        """What is left to show when generation ended by itself."""
        out = "" if self.ended else self.text[self.shown:]
        self.shown = len(self.text)
        return out


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
