"""Row packing of model/data/loader.py: FIM and task examples never straddle rows, no padding, exact resume."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from model import formats
from model.data.fim import FIMConfig, FIMTokens, newline_mask, split_long
from model.data.loader import BatchLoader, LoaderConfig, open_split

ROOT = Path(__file__).resolve().parent.parent


def _pack(tok, out: Path, docs: list[list[int]], kind: str | None = None) -> Path:
    """Write the packed layout of docs/interfaces.md (``docs`` already end with eos)."""
    out.mkdir(parents=True, exist_ok=True)
    ids = [t for d in docs for t in d]
    np.asarray(ids, dtype=np.uint16).tofile(out / "train.bin")
    with open(out / "train.idx", "wb") as f:
        np.save(f, np.cumsum([0] + [len(d) for d in docs]).astype(np.int64))
    meta = {"dtype": "uint16", "vocab_size": tok.vocab_size, "splits": {"train": {"tokens": len(ids), "docs": len(docs)}}}
    if kind:
        meta["kind"] = kind
    (out / "meta.json").write_text(json.dumps(meta))
    return out


# Standard-library modules, not the project's own files (which change with every commit).
CORPUS_STDLIB = ("abc", "bisect", "calendar", "colorsys", "configparser", "copy", "difflib", "fnmatch", "glob",
                 "gzip", "heapq", "keyword", "numbers", "operator", "pprint", "shlex", "string", "tokenize",
                 "zipapp")


def _texts() -> list[str]:
    """Real Python files of realistic lengths (a few hundred to several thousand tokens each)."""
    std = Path(textwrap.__file__).parent
    files = [std / f"{name}.py" for name in CORPUS_STDLIB] + sorted(Path(json.__file__).parent.glob("*.py"))
    files += [Path(textwrap.__file__)]
    short = ["def add(a, b):\n    return a + b\n", "x = 1\n", "for i in range(3):\n    print(i)\n"]
    return [f.read_text() for f in files] + short


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def special(tok) -> FIMTokens:
    return FIMTokens.from_tokenizer(tok)


@pytest.fixture(scope="module")
def nl(tok) -> np.ndarray:
    return newline_mask(tok)


@pytest.fixture(scope="module")
def code_dir(tmp_path_factory, tok) -> Path:
    return _pack(tok, tmp_path_factory.mktemp("code"), [tok.encode(t) + [tok.eos_id] for t in _texts()])


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tok) -> Path:
    snippets = [t[: 30 + 17 * i] for i, t in enumerate(_texts()[:12])]
    docs = [formats.task_example(tok, "comment", s, "reasoning " * (i % 5), '"""Doc."""')[0]
            for i, s in enumerate(snippets)]
    return _pack(tok, tmp_path_factory.mktemp("tasks"), docs, kind="tasks")


def _loader(code_dir, special, nl, *, seq_len=128, seed=0, fim=1.0, tasks=None, task_ratio=0.0, **kw):
    return BatchLoader(
        open_split(code_dir, "train"),
        LoaderConfig(seq_len=seq_len, seed=seed, fim=FIMConfig(fim_rate=fim), task_ratio=task_ratio, **kw),
        special, nl, tasks=open_split(tasks, "train") if tasks is not None else None,
    )


def _stream(batches: list[np.ndarray]) -> np.ndarray:
    """The token stream the rows were cut from: row r is stream[r*L : r*L + L + 1]."""
    return np.concatenate([batches[0][0, :1]] + [b[:, 1:].reshape(-1) for b in batches])


def _rows(batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(batches)


def _check_rows_hold_whole_fim_examples(rows: np.ndarray, sp: FIMTokens) -> int:
    """Every <fim_middle> in a row has its <fim_prefix> and <fim_suffix> earlier in the same
    row (after the row's previous eos) and its closing eos later in it. Returns the count."""
    n = 0
    for row in rows.tolist():
        for m, t in enumerate(row):
            if t != sp.middle:
                continue
            eos_before = [i for i in range(m) if row[i] == sp.eos]
            start = eos_before[-1] + 1 if eos_before else 0
            head = row[start:m]
            assert head.count(sp.prefix) == 1 and head.count(sp.suffix) == 1, (row, m)
            assert sp.eos in row[m + 1 :], "the middle ends (eos) inside the same row"
            n += 1
    return n


def _examples(stream: np.ndarray, sp: FIMTokens) -> list[tuple[int, int]]:
    """(start, end) stream positions of every FIM example (first marker .. closing eos)."""
    s = stream.tolist()
    out, i = [], 0
    while i < len(s):
        if s[i] in (sp.prefix, sp.suffix):
            if sp.middle not in s[i:]:
                break  # cut off by the end of the rows read
            m = s.index(sp.middle, i)
            e = s.index(sp.eos, m) if sp.eos in s[m:] else len(s)
            out.append((i, e))
            i = e + 1
        else:
            i += 1
    return out


def _unfim(stream: np.ndarray, sp: FIMTokens) -> list[int]:
    """Undo FIM and drop eos/pad: the documents' text tokens in stream order."""
    s = stream.tolist()
    out, i = [], 0
    while i < len(s):
        t = s[i]
        if t in (sp.prefix, sp.suffix):
            if sp.eos not in s[i:]:
                break  # cut off by the end of the rows read
            a = s.index(sp.prefix if t == sp.suffix else sp.suffix, i + 1)
            m = s.index(sp.middle, a)
            e = s.index(sp.eos, m)
            first, second = s[i + 1 : a], s[a + 1 : m]
            prefix, suffix = (second, first) if t == sp.suffix else (first, second)
            out += prefix + s[m + 1 : e] + suffix
            i = e + 1
            continue
        if t not in (sp.eos, sp.pad):
            out.append(t)
        i += 1
    return out


@pytest.mark.parametrize("seq_len,fim", [(64, 1.0), (128, 0.5), (200, 0.9)])
def test_no_fim_example_straddles_a_row(code_dir, special, nl, seq_len, fim):
    ld = _loader(code_dir, special, nl, seq_len=seq_len, fim=fim)
    batches = [ld.next_batch(4) for _ in range(60)]
    rows = _rows(batches)
    assert _check_rows_hold_whole_fim_examples(rows, special) > 30
    stream = _stream(batches)
    ex = _examples(stream, special)
    assert len(ex) > 30
    L = seq_len
    for a, e in ex[:-1]:  # the last one may run past the rows read so far
        r = a // L
        assert e <= r * L + L, f"example [{a}, {e}] straddles rows {r} and {r + 1}"
    if fim < 1.0:  # plain chunks still straddle freely (dense packing)
        assert any(t not in (special.pad,) for t in rows[:, -1].tolist())


def test_every_document_token_arrives_once_in_order(code_dir, special, nl, tok):
    ld = _loader(code_dir, special, nl, seq_len=96, fim=0.6, seed=3)
    batches = []
    while ld.epoch() < 1:
        batches.append(ld.next_batch(4))
    batches.append(ld.next_batch(40))  # flush the last document of the epoch out of the buffer
    code = open_split(code_dir, "train")
    perm = np.random.default_rng([3, 0, 0, 0x5EED]).permutation(code.num_docs)
    want = [t for i in perm for t in np.asarray(code.doc(int(i)))[:-1].tolist()]
    got = _unfim(_stream(batches), special)
    assert got[: len(want)] == want


@pytest.mark.parametrize("seq_len", [96, 256])
def test_no_padding_and_fim_share_close_to_the_rate(code_dir, special, nl, seq_len):
    """Every position holds a document token; the FIM share drops only a little below fim_rate."""
    ld = _loader(code_dir, special, nl, seq_len=seq_len, fim=0.5)
    rows = _rows([ld.next_batch(8) for _ in range(120)])
    assert not (rows == special.pad).any()
    share = ld.fim_share()
    print(f"\nseq_len {seq_len}, fim_rate 0.5: FIM share of code tokens {share:.3f}, padding 0")
    assert 0.38 < share < 0.6


def test_fim_chunks_fill_rows(code_dir, special, nl):
    """Code chunks are cut to fit the row they start in, so a FIM example rarely wastes a row."""
    L = 128
    ld = _loader(code_dir, special, nl, seq_len=L, fim=1.0)
    rows = _rows([ld.next_batch(8) for _ in range(10)])
    assert not (rows == special.pad).any()
    ex = _examples(_stream([rows]), special)
    lengths = [e - a + 1 for a, e in ex[:-1]]
    assert max(lengths) <= L + 1
    # long documents are cut at the line that fills the row, so the typical example is most of a row
    # (the corpus is this repository's own files, so the exact spread moves as they change)
    assert float(np.median(lengths)) >= 0.75 * L, sorted(lengths)


def test_task_examples_do_not_straddle(code_dir, task_dir, special, nl, tok):
    L = 128
    ld = _loader(code_dir, special, nl, seq_len=L, fim=0.5, tasks=task_dir, task_ratio=0.3)
    batches = [ld.next_batch(4) for _ in range(40)]
    stream = _stream(batches).tolist()
    tasks = open_split(task_dir, "train")
    exs = [np.asarray(tasks.doc(i)).tolist() for i in range(tasks.num_docs)]
    assert sum(L // 2 < len(e) <= L + 1 for e in exs) >= 3
    comment = tok.special_id("comment")
    starts = [i for i, t in enumerate(stream) if t == comment]
    assert len(starts) > 10
    for a in starts[:-1]:
        ex = next(e for e in exs if stream[a : a + len(e)] == e)  # whole and untouched
        r = a // L
        if len(ex) <= L + 1:  # a longer one cannot fit any row and packs densely
            assert a + len(ex) - 1 <= r * L + L, f"task example at {a} straddles a row"
    cur = ld.state_dict()["cursors"]
    share = cur["tasks"]["tokens"] / (cur["tasks"]["tokens"] + cur["code"]["tokens"])
    assert 0.25 < share < 0.35
    assert not (_rows(batches) == special.pad).any()


@pytest.mark.parametrize("with_tasks", [False, True])
def test_resume_at_every_batch_is_exact(code_dir, task_dir, special, nl, with_tasks):
    kw = {"tasks": task_dir, "task_ratio": 0.25} if with_tasks else {}
    a = _loader(code_dir, special, nl, seq_len=64, fim=0.7, seed=5, **kw)
    states, batches = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(a.state_dict())))  # survives a JSON round trip
        batches.append(a.next_batch(3))
    assert a.fim_tokens > 0 and any(s["cursors"]["code"]["off"] > 0 for s in states)
    for k in (0, 1, 7, 23, 39):
        b = _loader(code_dir, special, nl, seq_len=64, fim=0.7, seed=5, **kw)
        b.load_state_dict(states[k])
        for want in batches[k:]:
            assert np.array_equal(b.next_batch(3), want)
        assert b.state_dict() == a.state_dict()
    c = _loader(code_dir, special, nl, seq_len=64, fim=0.7, seed=6, **kw)
    assert not all(np.array_equal(c.next_batch(3), x) for x in batches[:5])


def test_old_position_resumes_at_the_same_chunk(code_dir, special, nl):
    """A position saved by the previous packing (no offsets) goes on at the chunk it named."""
    ld = _loader(code_dir, special, nl, seq_len=64, fim=0.0)
    code = open_split(code_dir, "train")
    perm = np.random.default_rng([0, 0, 0, 0x5EED]).permutation(code.num_docs)
    pos = next(p for p in range(code.num_docs) if len(code.doc(int(perm[p]))) > 200)
    old = {"cursors": {"code": {"epoch": 0, "pos": pos, "chunk": 2, "tokens": 999}}, "buf": [], "rows": 10,
           "seed": 0, "docs": {"code": code.num_docs}}
    ld.load_state_dict(old)
    chunks = split_long(np.asarray(code.doc(int(perm[pos])))[:-1], 64, nl)
    row = ld.next_batch(1)[0]
    want = np.concatenate(chunks[2:])[:65]
    assert row[: len(want)].tolist() == want.tolist()


def test_fim_needs_room(code_dir, special, nl):
    with pytest.raises(ValueError, match="seq_len must be >= 8"):
        _loader(code_dir, special, nl, seq_len=5, fim=0.5)
    _loader(code_dir, special, nl, seq_len=5, fim=0.0).next_batch(2)  # plain packing works at any length
