"""Tokenizer: byte-exact round trips, special tokens, streaming, training, the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.formats import SPECIAL_TOKENS, fim_example
from model.tokenizer import SPACE_MARK, Tokenizer, TokenizerError, chunk_text, train_tokenizer

SHIPPED = Path(__file__).resolve().parent.parent / "model" / "weights" / "tokenizer.model"
needs_shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="shipped tokenizer not built yet")

TRICKY = [
    "",
    "\n",
    "\n\n\n",
    "a\tb\t\tc",
    "line one\r\nline two\r\n",
    "x = 1        # runs of    spaces   ",
    "   leading and trailing   ",
    SPACE_MARK,
    f"a {SPACE_MARK} b{SPACE_MARK}{SPACE_MARK}c {SPACE_MARK}",
    "héllo wörld — ünïcödé ✓ 日本語 🙂🚀 \u200b zero width",
    "\x00\x01\x7f control chars \x1b[0m",
    "<|endoftext|> <|fim_prefix|> text that looks like specials",
    "def f(x):\n    return x  \n\n\tpass\n",
    "\ufeffBOM at start",
    "\U0010ffff max code point",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert tiny_tokenizer.decode_bytes(ids) == text.encode("utf-8")
    assert tiny_tokenizer.count(text) == len(ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_round_trip_property(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.sampled_from([" ", "\t", "\n", "\r", SPACE_MARK, "a", "é", "🙂", "#", "_"]), max_size=80))
def test_round_trip_whitespace_heavy(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_specials(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = {name: tok.special_id(name) for name in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert tok.pad_id == ids["pad"] == 0 and tok.eos_id == ids["eos"] == 1
    for name, i in ids.items():
        assert tok.id_to_piece(i) == SPECIAL_TOKENS[name]
        assert tok.decode([i]) == ""
        assert tok.is_special(i)
    # text spelling a special token never produces the special id
    text = "".join(SPECIAL_TOKENS.values())
    enc = tok.encode(text)
    assert not set(enc) & set(ids.values())
    assert tok.decode(enc) == text
    with pytest.raises(KeyError, match="unknown special token"):
        tok.special_id("nope")
    # formats use them
    ex = fim_example(tok, "def f(", "x", "):\n")
    assert ex[0] == ids["fim_prefix"] and ex[-1] == ids["eos"]
    assert tok.decode(ex) == "def f():\nx"  # prefix, suffix, middle; specials decode to ""


def test_stream_decoder_never_splits_characters(tiny_tokenizer):
    text = "naïve 🙂 日本 ok"
    ids = tiny_tokenizer.encode(text)
    dec = tiny_tokenizer.stream_decoder()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    for p in pieces:
        p.encode("utf-8")  # every delta is whole characters
        assert "\ufffd" not in p
    assert b"\xf0" in b"".join(tiny_tokenizer.decode_bytes([i]) for i in ids)  # bytes pieces exist


def test_decode_out_of_range(tiny_tokenizer):
    with pytest.raises(ValueError, match="out of range"):
        tiny_tokenizer.decode([tiny_tokenizer.vocab_size + 5])


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError):
        Tokenizer.load(bad)
    assert issubclass(TokenizerError, ValueError)


def test_train_from_texts_and_chunking(tmp_path):
    texts = [f"def function_{i}(alpha, beta):\n    return alpha * {i} + beta\n" * 20 for i in range(50)]
    path = train_tokenizer(texts, tmp_path / "t", vocab_size=400)
    assert path.is_file() and path.suffix == ".model"
    assert not (tmp_path / "t.vocab").exists()
    tok = Tokenizer.load(path)
    assert tok.vocab_size <= 400
    assert tok.decode(tok.encode(texts[3])) == texts[3]
    long = "".join(f"line {i}\n" for i in range(3000))
    chunks = list(chunk_text(long, 4096))
    assert "".join(chunks) == long and all(len(c) <= 4096 for c in chunks)
    assert all(c.endswith("\n") for c in chunks)


@needs_shipped
def test_shipped_tokenizer_basics():
    tok = Tokenizer.load(SHIPPED.parent)
    assert tok.vocab_size == 16384
    assert tok.pad_id == 0 and tok.eos_id == 1
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    code = "    def forward(self, x):\n        return self.linear(x)\n"
    assert len(tok.encode(code)) < len(code) / 2.5


@needs_shipped
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_shipped_round_trip_property(text):
    tok = _shipped()
    assert tok.decode(tok.encode(text)) == text


_CACHE: dict = {}


def _shipped() -> Tokenizer:
    if "tok" not in _CACHE:
        _CACHE["tok"] = Tokenizer.load(SHIPPED)
    return _CACHE["tok"]


@needs_shipped
@pytest.mark.slow
def test_shipped_round_trip_every_test_split_file(tmp_path_factory):
    """Every file of the stdlib corpus's test split round-trips; prints tokens per byte."""
    from test_corpus import stdlib_corpus

    from model.data.corpus import iter_split

    out = stdlib_corpus(tmp_path_factory.getbasetemp())
    tok = _shipped()
    n_files = n_bytes = n_tokens = 0
    for rec in iter_split(out, "test"):
        text = rec["text"]
        ids = tok.encode(text)
        assert tok.decode(ids) == text, rec["path"]
        n_files += 1
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
    assert n_files > 0
    ratio = n_tokens / n_bytes
    print(f"\nshipped tokenizer on stdlib test split: {n_files} files, {n_bytes} bytes, {n_tokens} tokens, "
          f"{ratio:.4f} tokens/byte ({n_bytes / n_tokens:.3f} bytes/token)")
    assert ratio < 0.4  # a trained code tokenizer, not bytes


def test_cli_tokenizer(tmp_path, capsys):
    from model.data.cli import main

    src = tmp_path / "src"
    for p in range(6):
        d = src / f"proj{p}"
        d.mkdir(parents=True)
        for k in range(4):
            (d / f"m{k}.py").write_text("".join(
                f"def p{p}_m{k}_f{i}(value, count={i}):\n    '''Return {i}.'''\n    return value * count + {p}\n\n"
                for i in range(30)))
    assert main(["corpus", str(src), "--out", str(tmp_path / "c"), "--eval-dir", "", "-q", "--workers", "1",
                 "--splits", "0.6,0.2,0.2"]) == 0
    out = tmp_path / "tok.model"
    assert main(["tokenizer", str(tmp_path / "c"), "--out", str(out), "--vocab-size", "600"]) == 0
    msg = capsys.readouterr().out
    assert "tokens/byte" in msg and "round-trip failures 0" in msg
    assert Tokenizer.load(out).vocab_size <= 600
    assert main(["tokenizer", str(tmp_path / "c"), "--out", str(out), "--vocab-size", "600"]) == 2  # exists
    assert main(["tokenizer", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.model")]) == 2
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["kept_files"] == 24
