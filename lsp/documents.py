"""Open documents and LSP positions, done by the spec.

LSP positions are (line, character) where lines end at ``\\n``, ``\\r\\n`` or ``\\r``
and ``character`` counts code units of the negotiated encoding (UTF-16 unless the
client offered another in ``general.positionEncodings``). Python strings index code
points, and the assistant's requests count lines by ``\\n`` only, so every conversion
goes through one absolute offset into the document text.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass, field

from lsprotocol import types

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"


def _width(ch: str, encoding: str) -> int:
    cp = ord(ch)
    if encoding == UTF16:
        return 2 if cp > 0xFFFF else 1
    if encoding == UTF8:
        return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4
    return 1


def units(text: str, encoding: str) -> int:
    """Length of ``text`` in code units of ``encoding``."""
    if encoding == UTF32 or text.isascii():
        return len(text)
    if encoding == UTF16:
        return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)
    return len(text.encode("utf-8", errors="surrogatepass"))


def column_from_units(line: str, character: int, encoding: str) -> int:
    """Code-point index in ``line`` for ``character`` code units (clamped to the line end;
    a position inside a multi-unit character rounds down to its start)."""
    if encoding == UTF32 or line.isascii():
        return max(0, min(character, len(line)))
    acc = 0
    for i, ch in enumerate(line):
        w = _width(ch, encoding)
        if acc + w > character:
            return i
        acc += w
    return len(line)


def normalize_encoding(value: object) -> str:
    v = str(getattr(value, "value", value) or UTF16).lower()
    return v if v in (UTF8, UTF16, UTF32) else UTF16


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Lone UTF-16 surrogates (JSON can carry them, UTF-8 cannot) become U+FFFD: one UTF-16
    unit for one, so every position the client sends stays right."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


@dataclass
class Document:
    """One open text document: its text, version and language, plus position maths."""

    uri: str
    text: str
    version: int | None = None
    language_id: str = ""
    encoding: str = UTF16
    _starts: list[int] | None = field(default=None, repr=False)
    _nl_starts: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.text = clean_text(self.text)

    # -- lines ------------------------------------------------------------------------
    @property
    def starts(self) -> list[int]:
        """Offsets where each LSP line starts."""
        if self._starts is None:
            self._starts = [0, *(m.end() for m in _LINE_BREAK.finditer(self.text))]
        return self._starts

    @property
    def line_count(self) -> int:
        return len(self.starts)

    def line_bounds(self, line: int) -> tuple[int, int]:
        """(start, end) offsets of ``line``'s content, without its line break."""
        starts = self.starts
        start = starts[line]
        if line + 1 < len(starts):
            end = starts[line + 1]
            end -= 2 if self.text.startswith("\r\n", end - 2) else 1
        else:
            end = len(self.text)
        return start, end

    def line_text(self, line: int) -> str:
        s, e = self.line_bounds(line)
        return self.text[s:e]

    # -- client positions <-> offsets -------------------------------------------------------
    def offset_at(self, pos: types.Position) -> int | None:
        """Offset of a client position; None when the line is not in the document."""
        if pos.line < 0 or pos.character < 0 or pos.line >= self.line_count:
            return None
        s, e = self.line_bounds(pos.line)
        return s + column_from_units(self.text[s:e], pos.character, self.encoding)

    def clamped_offset(self, pos: types.Position) -> int:
        """Offset of a position, positions past the end meaning the end (for edits)."""
        if pos.line < 0:
            return 0
        if pos.line >= self.line_count:
            return len(self.text)
        off = self.offset_at(pos)
        return 0 if off is None else off

    def position_at(self, offset: int) -> types.Position:
        offset = max(0, min(offset, len(self.text)))
        line = bisect_right(self.starts, offset) - 1
        s, e = self.line_bounds(line)
        offset = min(offset, e)
        return types.Position(line=line, character=units(self.text[s:offset], self.encoding))

    def range_of(self, start: int, end: int) -> types.Range:
        return types.Range(start=self.position_at(start), end=self.position_at(end))

    # -- the assistant's view: lines split at "\n", columns in code points ---------------
    @property
    def nl_starts(self) -> list[int]:
        if self._nl_starts is None:
            self._nl_starts = [0, *(m.end() for m in re.finditer("\n", self.text))]
        return self._nl_starts

    def engine_line_col(self, offset: int) -> tuple[int, int]:
        line = bisect_right(self.nl_starts, offset) - 1
        return line, offset - self.nl_starts[line]

    def engine_line_offset(self, line: int) -> int | None:
        """Offset where the assistant's 0-based ``line`` starts (None if out of range)."""
        if 0 <= line < len(self.nl_starts):
            return self.nl_starts[line]
        return None

    def engine_line_text(self, line: int) -> str:
        s = self.engine_line_offset(line)
        if s is None:
            return ""
        e = self.text.find("\n", s)
        return (self.text[s:] if e < 0 else self.text[s:e]).rstrip("\r")

    # -- edits ------------------------------------------------------------------------
    def apply_change(self, change: types.TextDocumentContentChangeEvent) -> None:
        rng = getattr(change, "range", None)
        text = clean_text(change.text)
        if rng is None:
            self.text = text
        else:
            s, e = self.clamped_offset(rng.start), self.clamped_offset(rng.end)
            if e < s:
                s, e = e, s
            self.text = self.text[:s] + text + self.text[e:]
        self._starts = None
        self._nl_starts = None
