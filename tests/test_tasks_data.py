"""Synthetic task data (model/data/tasks.py): generator invariants, eval overlap, files on disk."""

from __future__ import annotations

import ast
import json
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest

from model.data import tasks as T
from model.formats import NO_ISSUE, number_lines, parse_finding
from tests.shared_data import require_shared

# Small functions where each mutation kind applies, with inputs that expose a behaviour change.
FUNCS = {
    "variable_misuse": ("def f(xs, k):\n    total = 0\n    for x in xs:\n        total = total + x * k\n    return total\n", [([1, 2, 3], 2), ([4], 3)]),
    "binary_operator": ("def f(a, b):\n    c = a + b\n    return c * 2\n", [(3, 1), (5, 2)]),
    "comparison": ("def f(xs, n):\n    out = []\n    for x in xs:\n        if x < n:\n            out.append(x)\n    return out\n", [([1, 2, 3], 2), ([5, 1], 5)]),
    "boolean_operator": ("def f(a, b):\n    if a > 0 and b > 0:\n        return 1\n    return 0\n", [(1, -1), (-1, 1), (1, 1)]),
    "off_by_one": ("def f(n):\n    acc = []\n    for i in range(1, n):\n        acc.append(i)\n    return acc\n", [(5,), (3,)]),
    "swapped_arguments": ("def f(a, b):\n    return divmod(a, b)\n", [(7, 2), (9, 4)]),
    "negation": ("def f(x):\n    if x:\n        return 'yes'\n    return 'no'\n", [(1,), (0,)]),
    "wrong_return": ("def f(a, b):\n    s = a * b\n    return s\n", [(2, 3), (1, 1)]),
}  # fmt: skip


def _run(code: str, args):
    ns: dict = {}
    exec(compile(code, "<t>", "exec"), ns)
    try:
        return ("ok", ns["f"](*args))
    except Exception as e:  # a crash is a behaviour too
        return ("err", type(e).__name__)


def _check_mutation(code: str, m: T.Mutation) -> None:
    old, new = code.split("\n"), m.code.split("\n")
    assert len(old) == len(new)
    diff = [i + 1 for i, (a, b) in enumerate(zip(old, new)) if a != b]
    assert diff == [m.line], "exactly one line changes, the one named"
    assert ast.dump(ast.parse(code)) != ast.dump(ast.parse(m.code)), "the AST changes"
    assert old[m.line - 1] == m.old_line and new[m.line - 1] == m.new_line
    # the rest of the line keeps its formatting: indentation is untouched
    assert len(m.new_line) - len(m.new_line.lstrip()) == len(m.old_line) - len(m.old_line.lstrip())


@pytest.mark.parametrize("kind", T.MUTATIONS)
def test_each_mutation_changes_ast_and_behaviour(kind):
    code, inputs = FUNCS[kind]
    changed = 0
    for seed in range(8):
        m = T.mutate(code, random.Random(seed), kinds=[kind])
        assert m is not None and m.kind == kind
        _check_mutation(code, m)
        if any(_run(code, args) != _run(m.code, args) for args in inputs):
            changed += 1
        assert f"Line {m.line}" in m.reasoning
    assert changed >= 6, f"{kind}: most rewrites change what the function returns"


def test_mutation_keeps_other_formatting_and_unicode_columns():
    code = (
        "def f(s):\n    t = 'é' + s  # ünïcode\n    if len(t)  >  3:\n        return   t\n    return None\n"
    )
    for seed in range(30):
        m = T.mutate(code, random.Random(seed))
        assert m is not None
        _check_mutation(code, m)
    m = T.mutate(code, random.Random(0), kinds=["comparison"])
    assert m.new_line == "    if len(t)  >=  3:"


def _stdlib_sources(n: int = 25) -> list[tuple[str, str]]:
    import collections
    import json as json_mod

    root = Path(json_mod.__file__).parent.parent
    picks = [Path(collections.__file__), root / "textwrap.py", root / "difflib.py", root / "shlex.py",
             root / "fractions.py", root / "statistics.py", root / "heapq.py", root / "bisect.py"]  # fmt: skip
    picks += sorted(root.glob("json/*.py"))
    return [(str(p), p.read_text(encoding="utf-8")) for p in picks[:n] if p.is_file()]


def test_generators_on_real_code_hold_their_invariants():
    exs = []
    for path, text in _stdlib_sources():
        exs += T.examples_for_source(text, path, "stdlib")
    debug = [e for e in exs if e["task"] == "debug"]
    comment = [e for e in exs if e["task"] == "comment"]
    assert len(debug) > 100 and len(comment) > 50
    assert {e["task"] for e in exs} == {"comment", "debug", "explain"}
    clean = [e for e in debug if e["answer"] == NO_ISSUE]
    assert len(clean) >= len(debug) / 3, "at least a third of debug examples are untouched functions"
    assert len({e["bug"] for e in debug if e["bug"]}) == len(T.MUTATIONS), "every mutation kind occurs"
    for e in debug:
        shown = "\n".join(line.split("| ", 1)[1] for line in e["code"].split("\n"))
        assert number_lines(shown) == e["code"]
        ast.parse(shown)  # parseable code
        finding = parse_finding(e["answer"])
        if e["bug"] is None:
            assert finding is None and shown == e["original"]
            continue
        assert ast.dump(ast.parse(shown)) != ast.dump(ast.parse(e["original"]))
        lines, orig = shown.split("\n"), e["original"].split("\n")
        assert [i + 1 for i, (a, b) in enumerate(zip(lines, orig)) if a != b] == [finding.line]
        assert finding.fix == orig[finding.line - 1].strip()
        assert e["reasoning"].startswith(f"Line {finding.line} ") and len(e["reasoning"]) <= 320  # short
    for e in comment:
        ast.parse(e["code"])
        node = ast.parse(e["code"]).body[0]
        assert ast.get_docstring(node) is None, "comment input is shown without its docstring"
        assert 0 < len(e["answer"]) <= T.MAX_ANSWER_CHARS + 3
        assert e["reasoning"].startswith("Take")


def test_comment_facts_and_docstring_sections():
    code = textwrap.dedent('''
        def load(path, mode="r"):
            """Load the config file.

            Longer text that is not kept.

            Args:
                path: where the file is.
                mode: open mode.

            Returns:
                The parsed config dict.

            Example:
                >>> load("x")
            """
            if not path:
                raise ValueError("empty path")
            with open(path, mode) as fh:
                cfg = json.loads(fh.read())
            return cfg
    ''').strip()
    (ex,) = [e for e in T.examples_for_source(code, "p.py", "pkg") if e["task"] in ("comment", "explain")]
    assert ex["reasoning"].startswith(
        "Takes `path` and `mode`. Returns `cfg`. Raises ValueError when `not path`."
    )
    assert "json.loads" in ex["reasoning"]
    target = T.docstring_target(ast.get_docstring(ast.parse(code).body[0]))
    assert target.startswith("Load the config file.\n\nArgs:\n    path: where the file is.")
    assert "Returns:\n    The parsed config dict." in target
    assert "Longer text" not in target and "Example" not in target
    numpy_doc = "Sum it.\n\nParameters\n----------\nx : int\n    a number\n\nNotes\n-----\nnone\n"
    assert T.docstring_target(numpy_doc) == "Sum it.\n\nParameters\n----------\nx : int\n    a number"
    assert len(T.docstring_target("word " * 200)) <= T.MAX_ANSWER_CHARS + 3


def test_no_eval_overlap(tmp_path):
    overlap = T.EvalOverlap()
    require_shared(overlap.eval_dir / "mbpp", "the eval sets (../shared/eval)")
    mbpp = json.loads((overlap.eval_dir / "mbpp" / "sanitized-mbpp.json").read_text())
    qb = sorted((overlap.eval_dir / "quixbugs" / "correct_python_programs").glob("*.py"))
    eval_src = [t["code"] for t in mbpp[:40]] + [p.read_text() for p in qb[:10]]
    # an eval function renamed and re-indented inside a class is still caught
    renamed = "class K:\n" + textwrap.indent(qb[0].read_text().replace("def ", "def renamed_"), "    ")
    own = "def fine(a, b):\n    '''Add two numbers together.'''\n    c = a + b\n    return c\n"
    text = "\n\n".join([*eval_src, renamed, own])
    exs = T.examples_for_source(text, "mix.py", "mix", overlap)
    assert {e["function"] for e in exs} == {"fine"}
    # every eval function is recognised by the checker
    for src in eval_src:
        for f in T.extract_functions(src):
            assert overlap.contains(f)


def _write_corpus(root: Path) -> None:
    sources = _stdlib_sources(8)
    mbpp_code = "def similar_elements(test_tup1, test_tup2):\n  res = tuple(set(test_tup1) & set(test_tup2))\n  return (res) \n"
    for i, split in enumerate(("train", "valid", "test")):
        d = root / split
        d.mkdir(parents=True)
        recs = [{"text": t, "path": p, "package": f"pkg{i}"} for p, t in sources[i::3]]
        if split == "train":
            recs.append({"text": mbpp_code, "path": "leak.py", "package": "leak"})
        with (d / "shard-00000.jsonl").open("w") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")


def test_build_tasks_writes_packed_layout(tmp_path, tiny_tokenizer, tiny_tokenizer_path):
    corpus, out = tmp_path / "corpus", tmp_path / "tasks"
    _write_corpus(corpus)
    meta = T.build_tasks(
        corpus, out, tokenizer=tiny_tokenizer, tokenizer_path=tiny_tokenizer_path, max_functions=300
    )
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (
        meta["kind"] == "tasks"
        and meta["dtype"] == "uint16"
        and meta["vocab_size"] == tiny_tokenizer.vocab_size
    )
    eos, think = tiny_tokenizer.eos_id, tiny_tokenizer.special_id("think")
    for split in ("train", "valid", "test"):
        rows = [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
        toks = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        idx, tgt = np.load(out / f"{split}.idx"), np.load(out / f"{split}.tgt")
        s = meta["splits"][split]
        assert len(rows) == s["docs"] == len(idx) - 1 == len(tgt) and s["tokens"] == len(toks) == idx[-1]
        assert s["docs"] <= (300 if split == "train" else 30)
        assert all(r["package"] == f"pkg{('train', 'valid', 'test').index(split)}" for r in rows), (
            "split by package"
        )
        for k in range(len(rows)):
            doc = toks[idx[k] : idx[k + 1]].tolist()
            assert doc[-1] == eos and doc[tgt[k] - idx[k] - 1] == think
            assert doc[0] == tiny_tokenizer.special_id(rows[k]["task"])
            assert tiny_tokenizer.decode(doc[tgt[k] - idx[k] :]).startswith(rows[k]["reasoning"][:20])
    assert not any(
        r["path"] == "leak.py" for r in map(json.loads, (out / "train.jsonl").read_text().splitlines())
    )
    assert meta["eval_functions"] > 0 and meta["malformed_records"] == 0
    from model.data.packed import PackedTokens

    pt = PackedTokens(out, "train")
    assert pt.eos_id == eos and len(pt) == meta["splits"]["train"]["docs"]
    import hashlib

    assert meta["tokenizer_sha256"] == hashlib.sha256(Path(tiny_tokenizer_path).read_bytes()).hexdigest()


def test_malformed_corpus_records_are_skipped(tmp_path, tiny_tokenizer):
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    good = {"text": "def f(a, b):\n    c = a + b\n    return c\n", "path": "a.py", "package": "a"}
    lines = ["not json", json.dumps({"text": None, "path": "x"}), json.dumps(good), "[1, 2]"]
    (corpus / "train" / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")
    meta = T.build_tasks(corpus, tmp_path / "out", tokenizer=tiny_tokenizer, max_functions=10)
    assert meta["malformed_records"] == 3 and meta["splits"]["train"]["docs"] == 1


def test_cli_errors_and_run(tmp_path, tiny_tokenizer_path, capsys):
    assert (
        T.main(
            [str(tmp_path / "nope"), "--tokenizer", str(tiny_tokenizer_path), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "not a corpus directory" in capsys.readouterr().err
    corpus = tmp_path / "corpus"
    _write_corpus(corpus)
    assert (
        T.main([str(corpus), "--tokenizer", str(tmp_path / "missing.model"), "--out", str(tmp_path / "o")])
        == 2
    )
    other = tmp_path / "packed"
    other.mkdir()
    (other / "meta.json").write_text('{"dtype": "uint16"}')
    assert T.main([str(corpus), "--tokenizer", str(tiny_tokenizer_path), "--out", str(other)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (other / "meta.json").read_text() == '{"dtype": "uint16"}'
    out = tmp_path / "o"
    rc = T.main([str(corpus), "--tokenizer", str(tiny_tokenizer_path), "--out", str(out),
                 "--max-functions", "40", "--workers", "2"])  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["train"]["docs"] == 40
    # parallel output equals the in-process output (deterministic per function)
    ref = T.build_tasks(
        corpus, tmp_path / "ref", tokenizer_path=tiny_tokenizer_path, max_functions=40, workers=1
    )
    assert ref["splits"] == meta["splits"]
    assert (tmp_path / "ref" / "train.bin").read_bytes() == (out / "train.bin").read_bytes()


def test_eval_dir_follows_the_corpus_report(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    assert T.corpus_eval_dir(corpus) is None
    ev = tmp_path / "ev"
    ev.mkdir()
    (corpus / "report.json").write_text(json.dumps({"config": {"eval_dir": str(ev)}}))
    assert T.corpus_eval_dir(corpus) == str(ev)
    (corpus / "report.json").write_text(json.dumps({"config": {"eval_dir": str(tmp_path / "gone")}}))
    assert T.corpus_eval_dir(corpus) is None
