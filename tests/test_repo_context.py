"""One renderer for repository context: the ast index (training data) and the tree-sitter index
(the product) give the same context text, and a training example is the product's prompt."""

from __future__ import annotations

from pathlib import Path

from assistant.context import build_context
from assistant.repo import RepoIndex as TreeSitterIndex
from model.data import repo_fim
from model.data.repo_context import RepoIndex as AstIndex
from model.data.repo_context import ast_imports
from model.tokenizer import Tokenizer

UTIL = '''"""Helpers."""
import os

LIMIT = 10


@staticmethod
def scale(values,
          factor=2.0):
    # a comment before the body
    """Multiply every value by factor."""
    out = [v * factor for v in values]
    return out


class Meter:

    """A running total."""

    def __init__(self, start=0):
        self.total = start

    if os.name:
        def add(self, x):
            self.total += x

    def _private(self):
        pass


try:
    from .fmt import show as fallback
except ImportError:
    fallback = None
'''

MAIN = '''from .util import scale, Meter as M
from . import fmt
import os

if os.name == "nt":
    from .util import LIMIT
elif os.name == "posix":
    from .fmt import show
else:
    from .util import fallback


def run(xs):
    m = M()
    ys = scale(xs)
    m.add(LIMIT)
    return fmt.show(ys)
'''


def _package(tmp_path: Path) -> Path:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .util import scale as public_scale\n")
    (pkg / "util.py").write_text(UTIL)
    (pkg / "fmt.py").write_text("def show(items, sep=', '):\n    '''Join.'''\n    return sep.join(map(str, items))\n")
    (pkg / "main.py").write_text(MAIN)
    return pkg


def test_ast_and_tree_sitter_indexes_give_the_same_context(tmp_path):
    root = _package(tmp_path)
    a, t = AstIndex(root), TreeSitterIndex(root)
    checked = 0
    for rel in a.files():
        src = (root / rel).read_text()
        assert a.analyse(src, rel) == t.analyse(src, rel)
        assert [x.local for x in a.imported_names(src, rel)] == [x.local for x in t.imported_names(src, rel)]
        for line in range(len(src.split("\n"))):
            got = a.context_for(rel, src, line, recent=[])
            assert got == t.context_for(rel, src, line, recent=[])
            checked += bool(got[0])
    assert checked > 10
    pieces, added = a.context_for("main.py", MAIN, MAIN.split("\n").index("    ys = scale(xs)"), recent=[])
    assert added[0] == "scale"  # the name at the cursor first
    stub = dict(pieces)["util.py"]
    # the header ends at its colon (no comment line), the docstring's first line, no body
    assert stub.startswith('def scale(values,\n          factor=2.0):\n    """Multiply every value by factor."""\n    ...')
    assert "class Meter:\n    \"\"\"A running total.\"\"\"\n    def __init__(self, start=0): ...\n    def add(self, x): ..." in stub
    assert "self.total" not in stub and "_private" not in stub


def test_ast_imports_skip_elif_branches_like_tree_sitter():
    names = [a.name for st in ast_imports(MAIN) for a in st.names]
    assert "show" not in names and names[:4] == ["scale", "Meter", "fmt", "os"] and set(names[4:]) == {"LIMIT", "fallback"}


def test_training_example_is_the_product_prompt(tmp_path):
    root = _package(tmp_path)
    tok = Tokenizer.load(Path(__file__).resolve().parents[1] / "model" / "weights" / "tokenizer.model")
    lines = MAIN.split("\n")
    i = lines.index("    ys = scale(xs)")
    blanked = lines[:i] + ["    "] + lines[i + 1:]
    idx = AstIndex(root)
    related, _ = idx.context_for("main.py", "\n".join(blanked), i, recent=[], imports_source=MAIN)
    assert related
    budget = 900
    ids = repo_fim.example_ids(tok, lambda s: len(tok.encode(s)), blanked, i, related, budget, "ys = scale(xs)")
    ctx = build_context(tok, "\n".join(blanked), i, 4, budget=budget, related=related, related_share=0.35,
                        related_sep=False)
    m = ids.index(tok.special_id("fim_middle"))
    assert ids[: m + 1] == ctx.prompt_ids
    assert tok.decode(ids[m + 1 : -1]) == "ys = scale(xs)" and ids[-1] == tok.special_id("eos")


def test_build_appends_examples_to_the_task_data(tmp_path):
    import json

    root = _package(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with open(corpus / "manifest.jsonl", "w") as fh:
        for f in sorted(root.glob("*.py")):
            fh.write(json.dumps({"path": str(f), "package": "pkg", "split": "train"}) + "\n")
    tok_path = str(Path(__file__).resolve().parents[1] / "model" / "weights" / "tokenizer.model")
    rep = repo_fim.build(str(corpus), tok_path, None, str(tmp_path / "a"), examples=6, workers=1, context_rate=1.0)
    assert rep["examples"] >= 4 and rep["with_context"] >= 1
    rep2 = repo_fim.build(str(corpus), tok_path, str(tmp_path / "a"), str(tmp_path / "b"), examples=6, workers=1)
    from model.data.loader import open_split

    a, b = open_split(tmp_path / "a", "train"), open_split(tmp_path / "b", "train")
    assert b.num_docs == a.num_docs + rep2["examples"] and list(b.doc(0)) == list(a.doc(0))
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["kind"] == "tasks"
