"""Repository context for completion: definitions of names the cursor's code uses from other files.

``RepoIndex(root)`` is ``model.data.repo_context.RepoIndex`` (its docstring says what
``context_for`` answers: the definitions of names used near the cursor, resolved through the
document's imports, then outlines of recently edited files) with one difference: the
document's imports are found with tree-sitter.

The index, the resolution and the rendering of the stubs live in ``model.data.repo_context``
(the training data is built with them, parsing with ``ast``); this module parses with
tree-sitter, so files being edited that do not parse still give their imports and definitions.

Everything is stubs, never whole bodies: they are small, so many fit in the budget. The
pieces come most important first: the context manager keeps them in order until its budget
for related code is used.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from assistant import code as codemod
from model.data import repo_context as rc
from model.data.repo_context import (  # noqa: F401 - the public names of this module
    MAX_FILE_BYTES,
    MAX_FILES,
    SKIP_DIRS,
    Definition,
    ImportedName,
    first_line_of_docstring,
    variable_lines,
)

_first_line_of_docstring = first_line_of_docstring
_variable_lines = variable_lines


def _scope_info(s: codemod.Scope, lines: list[str]) -> rc.ScopeInfo:
    end = s.signature_end_line  # a comment or blank line before the body is not the header's
    while end > s.start_line and (not lines[end].strip() or lines[end].lstrip().startswith("#")):
        end -= 1
    return rc.ScopeInfo(s.kind, s.name, s.qualname, s.start_line, end, s.indent, s.docstring, s.parent)


def analyse_file(source: str, rel: str) -> tuple[dict[str, Definition], str]:
    """(top-level definitions by name, outline of the file's signatures), scopes by tree-sitter."""
    lines = source.split("\n")
    return rc.analyse_scopes(source, rel, [_scope_info(s, lines) for s in codemod.scopes(source)])


def _imports(source: str) -> list[ast.stmt]:
    """Import statements of ``source`` (tree-sitter finds them, even in a file with syntax errors)."""
    tree = codemod.parse(source)
    out: list[ast.stmt] = []
    stack = [tree.root_node]
    while stack:
        n = stack.pop()
        for c in n.named_children:
            if c.type in ("import_statement", "import_from_statement"):
                text = c.text.decode("utf-8", "replace") if c.text else ""
                try:
                    out.extend(s for s in ast.parse(text.strip()).body if isinstance(s, ast.Import | ast.ImportFrom))
                except SyntaxError:
                    continue
            elif c.type in ("if_statement", "try_statement", "block", "else_clause", "except_clause",
                            "finally_clause", "function_definition", "class_definition", "decorated_definition",
                            "with_statement"):
                stack.append(c)
    return out


class RepoIndex(rc.RepoIndex):
    """The Python files of one project and their top-level definitions (cached per file),
    parsed with tree-sitter (``model.data.repo_context.RepoIndex`` does the rest)."""

    def analyse(self, source: str, rel: str) -> tuple[dict[str, Definition], str]:
        return analyse_file(source, rel)

    def imports(self, source: str) -> list[ast.Import | ast.ImportFrom]:
        return _imports(source)  # type: ignore[return-value]


_INDEXES: dict[Path, RepoIndex] = {}


def index_for(root: str | os.PathLike) -> RepoIndex:
    """One shared index per project root (faces ask for it per request)."""
    key = Path(root).resolve()
    idx = _INDEXES.get(key)
    if idx is None:
        if len(_INDEXES) > 8:
            _INDEXES.clear()
        idx = _INDEXES[key] = RepoIndex(key)
    return idx


def find_root(path: str | os.PathLike) -> Path | None:
    """The project root above ``path``: the nearest directory with ``.git``, ``pyproject.toml``,
    ``setup.py`` or ``setup.cfg`` (None when there is none)."""
    p = Path(path).resolve()
    for d in [p, *p.parents] if p.is_dir() else list(p.parents):
        if any((d / m).exists() for m in (".git", "pyproject.toml", "setup.py", "setup.cfg")):
            return d
    return None
