"""Repository context: imports resolved to project files, definitions as stubs, in the prompt."""

from __future__ import annotations

import os
import time

from assistant.engine import Engine
from assistant.repo import RepoIndex, find_root
from assistant.tasks import TaskRequest, make_plan
from tests.assistant_fakes import ScriptedBackend

UTIL = '''"""Helpers."""
import os

LIMIT = 10


def scale(values, factor=2.0):
    """Multiply every value by factor."""
    out = [v * factor for v in values]
    return out


class Meter:
    """A running total."""

    def __init__(self, start=0):
        self.total = start

    def add(self, x):
        self.total += x

    def _private(self):
        pass
'''

MAIN = '''from .util import scale, Meter as M
from . import fmt
import os


def run(xs):
    m = M()
    ys = scale(xs)
    return fmt.show(ys)
'''


def _project(tmp_path):
    pkg = tmp_path / "proj" / "pkg"
    pkg.mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("[project]\nname='pkg'\n")
    (pkg / "__init__.py").write_text("from .util import scale as public_scale\n")
    (pkg / "util.py").write_text(UTIL)
    (pkg / "fmt.py").write_text("def show(items, sep=', '):\n    return sep.join(map(str, items))\n")
    (pkg / "main.py").write_text(MAIN)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "junk.py").write_text("x = 1\n")
    return tmp_path / "proj"


def test_files_imports_and_definitions(tmp_path):
    root = _project(tmp_path)
    idx = RepoIndex(root)
    assert idx.files() == ["pkg/__init__.py", "pkg/fmt.py", "pkg/main.py", "pkg/util.py"]
    names = {(i.local, i.module_file, i.attr) for i in idx.imported_names(MAIN, "pkg/main.py")}
    assert names == {("scale", "pkg/util.py", "scale"), ("M", "pkg/util.py", "Meter"), ("fmt", "pkg/fmt.py", None)}
    assert idx.module_file("pkg.util") == "pkg/util.py" and idx.module_file("os") is None
    d = idx.definition("pkg/util.py", "scale")
    assert d.stub == 'def scale(values, factor=2.0):\n    """Multiply every value by factor."""\n    ...'
    c = idx.definition("pkg/util.py", "Meter").stub
    assert c.startswith("class Meter:") and "def __init__(self, start=0): ..." in c and "def add(self, x): ..." in c
    assert "_private" not in c and "self.total += x" not in c
    assert idx.definition("pkg/util.py", "LIMIT").stub == "LIMIT = 10"
    # a re-export is followed to the real definition
    assert idx.definition("pkg/__init__.py", "public_scale").stub.startswith("def scale(")
    assert idx.definition("pkg/__init__.py", "scale") is None
    assert find_root(root / "pkg" / "main.py") == root


def test_context_for_orders_names_near_the_cursor_first(tmp_path):
    root = _project(tmp_path)
    idx = RepoIndex(root)
    pieces, added = idx.context_for(root / "pkg" / "main.py", MAIN, 8, recent=[])
    assert added[0] == "fmt.show"  # used on the cursor's line
    assert set(added) == {"fmt.show", "scale", "M"}
    text = "\n".join(t for _, t in pieces)
    assert "def show(items, sep=', '): ..." in text and "class Meter:" in text
    assert [p for p, _ in pieces] == ["pkg/fmt.py", "pkg/util.py"]
    # a file edited recently adds its outline
    later = time.time() + 5
    os.utime(root / "pkg" / "__init__.py", (later, later))
    _, added = idx.context_for(root / "pkg" / "main.py", MAIN, 8)
    assert added[-1] == "outline of pkg/__init__.py" or "pkg/__init__.py" not in added[-1]


def test_completion_prompt_carries_the_definitions_and_says_so(tmp_path, tiny_tokenizer):
    root = _project(tmp_path)
    eng = Engine.from_loaded(backend=ScriptedBackend(tiny_tokenizer, context_length=1024))
    src = MAIN.replace("    ys = scale(xs)\n", "    ys = \n")
    req = TaskRequest("complete", src, path=str(root / "pkg" / "main.py"), line=7, column=9)
    plain = make_plan(eng, req)
    req.repo = str(root)
    plan = make_plan(eng, req)
    prompt = tiny_tokenizer.decode(plan.prompt_ids)
    assert "def scale(values, factor=2.0):" in prompt and "def scale" not in tiny_tokenizer.decode(plain.prompt_ids)
    assert any(n.startswith("repository context: added ") and "scale" in n for n in plan.notes)
    assert len(plan.prompt_ids) <= eng.context_length
    # a repository that does not exist adds nothing and does not fail
    req.repo = str(tmp_path / "missing")
    assert make_plan(eng, req).prompt_ids == plain.prompt_ids
