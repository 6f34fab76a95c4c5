"""Positions and incremental edits of lsp.documents.Document (UTF-8/16/32, CRLF, non-BMP)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from lsprotocol import types

from lsp.documents import UTF8, UTF16, UTF32, Document, column_from_units, units


def P(line: int, character: int) -> types.Position:
    return types.Position(line=line, character=character)


def test_utf16_counts_non_bmp_characters_twice():
    line = 'x = "😀é"'
    assert units(line, UTF16) == 9 and units(line, UTF8) == 12 and units(line, UTF32) == 8
    # the closing quote: UTF-16 unit 8, UTF-8 byte 11, code point 7
    assert column_from_units(line, 8, UTF16) == 7
    assert column_from_units(line, 11, UTF8) == 7
    assert column_from_units(line, 7, UTF32) == 7
    # inside the surrogate pair: rounds down to the emoji's start
    assert column_from_units(line, 6, UTF16) == 5
    # past the end: the line end
    assert column_from_units(line, 99, UTF16) == len(line)


def test_lines_end_at_lf_crlf_and_cr_only():
    doc = Document("file:///t.py", "a\r\nbb\rccc\n\u2028d")
    assert doc.line_count == 4
    assert [doc.line_text(i) for i in range(4)] == ["a", "bb", "ccc", "\u2028d"]  # U+2028 is not a break
    assert doc.offset_at(P(1, 1)) == 4
    assert doc.offset_at(P(2, 3)) == 9
    assert doc.offset_at(P(4, 0)) is None  # no such line
    assert doc.position_at(9) == P(2, 3)
    assert doc.position_at(len(doc.text)) == P(3, 2)


def test_incremental_changes_with_emoji_and_positions_past_the_end():
    doc = Document("file:///t.py", "s = '😀'\nx = 1\n", encoding=UTF16)
    # replace the emoji (UTF-16 units 5..7) with "ok"
    doc.apply_change(types.TextDocumentContentChangePartial(range=types.Range(start=P(0, 5), end=P(0, 7)), text="ok"))
    assert doc.text == "s = 'ok'\nx = 1\n"
    # an insertion at a line past the end appends
    doc.apply_change(types.TextDocumentContentChangePartial(range=types.Range(start=P(9, 0), end=P(9, 0)), text="y"))
    assert doc.text.endswith("x = 1\ny")
    # a full-text change
    doc.apply_change(types.TextDocumentContentChangeWholeDocument(text="z = 2"))
    assert doc.text == "z = 2" and doc.line_count == 1


def test_engine_lines_are_split_at_lf_only():
    doc = Document("file:///t.py", "a\r\nb\rc\nd")
    assert doc.engine_line_col(doc.text.index("d")) == (2, 0)
    assert doc.engine_line_col(doc.text.index("c")) == (1, 2)
    assert doc.engine_line_text(0) == "a"
    assert doc.engine_line_offset(2) == doc.text.index("d") and doc.engine_line_offset(3) is None


text_st = st.lists(st.sampled_from(["a", "é", "😀", "\n", "\r\n", "\r", " ", "漢", "\t"]), max_size=40).map("".join)


@settings(max_examples=200, deadline=None)
@given(text_st, st.sampled_from([UTF8, UTF16, UTF32]), st.data())
def test_offsets_and_positions_round_trip(text, encoding, data):
    doc = Document("file:///t.py", text, encoding=encoding)
    inside_crlf = {i + 1 for i in range(len(text) - 1) if text[i:i + 2] == "\r\n"}
    offset = data.draw(st.integers(0, len(text)))
    if offset in inside_crlf or (offset < len(text) and text[offset] == "\n" and offset - 1 in inside_crlf):
        return
    pos = doc.position_at(offset)
    assert doc.offset_at(pos) == offset
    # the encoded column counts exactly the units of the line's text before the offset
    start = doc.starts[pos.line]
    assert pos.character == units(text[start:offset], encoding)
