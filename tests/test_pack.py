"""Packing a corpus into memory-mapped token files, and reading them back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.data.cli import main as data_main
from model.data.corpus import CorpusConfig, build_corpus, iter_split
from model.data.pack import pack_corpus
from model.data.packed import PackedTokens


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pack_src")
    for p in range(6):
        d = root / f"proj{p}"
        d.mkdir()
        for k in range(5):
            body = "".join(f"    v{i} = compute_{p}_{k}(x, {i})  # café ▁ 🙂\n" for i in range(10 + k))
            (d / f"mod{k}.py").write_text(f"def f_{p}_{k}(x):\n{body}    return x\n\tpass\r\n")
    out = tmp_path_factory.mktemp("pack_corpus") / "c"
    build_corpus([root], out, CorpusConfig(workers=1, eval_dir="", split_fractions=(0.6, 0.2, 0.2)), progress=False)
    return out


def test_pack_round_trip(small_corpus, tiny_tokenizer, tiny_tokenizer_path, tmp_path):
    meta = pack_corpus(small_corpus, tiny_tokenizer_path, tmp_path / "p", workers=1, progress=False)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tiny_tokenizer.vocab_size
    on_disk = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert on_disk["splits"] == meta["splits"]
    total_docs = 0
    for split in ("train", "valid", "test"):
        texts = [r["text"] for r in iter_split(small_corpus, split)]
        pt = PackedTokens(tmp_path / "p", split)
        assert len(pt) == len(texts) == meta["splits"][split]["docs"]
        assert pt.num_tokens == meta["splits"][split]["tokens"] == int(pt.doc_offsets[-1])
        assert pt.doc_offsets.dtype == np.int64 and pt.doc_offsets[0] == 0
        raw = np.fromfile(tmp_path / "p" / f"{split}.bin", dtype="<u2")
        assert np.array_equal(raw, np.asarray(pt.tokens))
        for i, text in enumerate(texts):
            doc = pt.doc(i)
            assert int(doc[-1]) == tiny_tokenizer.eos_id
            assert tiny_tokenizer.eos_id not in pt.doc(i, with_eos=False).tolist()
            assert tiny_tokenizer.decode(doc.tolist()) == text
        total_docs += len(texts)
    assert total_docs == 30


def test_pack_is_deterministic_across_workers(small_corpus, tiny_tokenizer_path, tmp_path):
    pack_corpus(small_corpus, tiny_tokenizer_path, tmp_path / "a", workers=1, progress=False)
    pack_corpus(small_corpus, tiny_tokenizer_path, tmp_path / "b", workers=2, progress=False)
    for split in ("train", "valid", "test"):
        for ext in ("bin", "idx"):
            assert (tmp_path / "a" / f"{split}.{ext}").read_bytes() == (tmp_path / "b" / f"{split}.{ext}").read_bytes()


def test_pack_cli_and_bad_input(small_corpus, tiny_tokenizer_path, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["pack", str(small_corpus), "--tokenizer", str(tiny_tokenizer_path), "--out", str(out), "-q",
            "--workers", "1"]
    assert data_main(args) == 0
    assert "packed ->" in capsys.readouterr().out
    before = (out / "train.bin").read_bytes()
    assert data_main(args) == 2  # does not overwrite without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "train.bin").read_bytes() == before
    assert data_main([*args, "--overwrite"]) == 0
    assert data_main(["pack", str(tmp_path / "nope"), "--tokenizer", str(tiny_tokenizer_path),
                      "--out", str(tmp_path / "q")]) == 2
    bad_tok = tmp_path / "bad.model"
    bad_tok.write_text("garbage")
    assert data_main(["pack", str(small_corpus), "--tokenizer", str(bad_tok), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err


def test_packed_tokens_errors(tmp_path, small_corpus, tiny_tokenizer_path):
    with pytest.raises(ValueError, match="no meta.json"):
        PackedTokens(tmp_path / "missing", "train")
    pack_corpus(small_corpus, tiny_tokenizer_path, tmp_path / "p", splits=["train"], workers=1, progress=False)
    with pytest.raises(ValueError, match="no split 'test'"):
        PackedTokens(tmp_path / "p", "test")
    pt = PackedTokens(tmp_path / "p", "train")
    with pytest.raises(IndexError):
        pt.doc(len(pt))
    # a truncated .bin is detected
    data = (tmp_path / "p" / "train.bin").read_bytes()
    (tmp_path / "p" / "train.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match="offsets do not match"):
        PackedTokens(tmp_path / "p", "train")
