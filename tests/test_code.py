"""assistant.code: tree-sitter helpers."""

from __future__ import annotations

from assistant import code

SRC = '''import os
from typing import (Any,
                    Callable)


@decorator
def top(a, b: int = 2, *args, key=None, **kw):
    """Summary.

    Args:
        a: first.
    """
    if a:
        raise ValueError("bad")
    return a + b


class Box:
    """A box."""

    def get(self, i):
        def helper(j):
            return j
        return helper(i)

    @property
    def size(self):
        yield 1


def one_liner(): return 1
'''


def test_functions_spans_docstrings_params():
    fs = {f.qualname: f for f in code.functions(SRC)}
    assert set(fs) == {"top", "Box.get", "Box.get.helper", "Box.size", "one_liner"}
    top = fs["top"]
    assert (top.decorated_start, top.start_line, top.end_line, top.body_start_line) == (5, 6, 14, 7)
    assert top.docstring.startswith('"""Summary.') and top.docstring_lines == (7, 11)
    assert top.params == ["a", "b", "*args", "key", "**kw"]
    assert top.param_types == {"b": "int"}
    assert top.raises == ["ValueError"] and top.returns_value
    get = fs["Box.get"]
    assert get.params == ["i"] and get.parent == "Box" and get.docstring is None
    assert get.indent == "    " and get.body_indent == "        "
    assert fs["Box.size"].returns_value  # yield counts
    assert fs["Box.get.helper"].parent == "Box.get"
    assert fs["one_liner"].body_start_line == fs["one_liner"].start_line


def test_function_at_and_enclosing_scopes():
    assert code.function_at(SRC, 22).qualname == "Box.get.helper"
    assert code.function_at(SRC, 23).qualname == "Box.get"
    assert code.function_at(SRC, 5).qualname == "top"  # the decorator line
    assert code.function_at(SRC, 0) is None
    assert [s.qualname for s in code.enclosing_scopes(SRC, 22)] == ["Box", "Box.get", "Box.get.helper"]
    assert code.find_function(SRC, "helper").qualname == "Box.get.helper"
    assert code.find_function(SRC, "Box.size").name == "size"
    assert code.find_function(SRC, "nope") is None


def test_import_lines_and_errors():
    assert code.import_lines(SRC) == [0, 1, 2]
    assert not code.has_errors(SRC)
    assert code.has_errors("def f(:\n  pass\n")


def test_line_numbering_matches_split():
    src = "x = 'é'\r\ny = 2\n\n"
    assert code.lines(src) == ["x = 'é'\r", "y = 2", "", ""]


def _doc_file(body: str) -> str:
    return f'def f(x):\n    """{body}\n    """\n    return x\n\n\ndef g(y):\n    """Plain one."""\n    return y\n'


def test_docstring_style_detection():
    google = _doc_file("Do it.\n\n    Args:\n        x: thing.\n\n    Returns:\n        it.")
    numpy = _doc_file("Do it.\n\n    Parameters\n    ----------\n    x : int\n        thing.")
    rest = _doc_file("Do it.\n\n    :param x: thing.\n    :returns: it.")
    plain = _doc_file("Do it.")
    assert code.docstring_style(google) == "google"
    assert code.docstring_style(numpy) == "numpy"
    assert code.docstring_style(rest) == "rest"
    assert code.docstring_style(plain) == "plain"
    assert code.docstring_style("def f():\n    return 1\n") == "google"  # no docstrings: the default
    assert code.docstring_style("def f():\n    return 1\n", default="numpy") == "numpy"
