"""Repository context for completion: what the prompt shows of the names a file imports from
other files of its project, and how it is rendered (one renderer for training and inference).

``RepoIndex(root)`` indexes the Python files of a project (lazily, cached per file on its
size and mtime). ``index.context_for(path, source, line)`` answers, for a cursor in
``path``, a list of ``(path, text)`` pieces for the context manager's ``related`` slot:

1. the imports of the document are resolved to files of the project: relative imports
   against the document's package, absolute ones against the project root (and a ``src/``
   layout);
2. names used near the cursor (nearest first), then the other imported names, are looked up
   in the files they come from: a function becomes its signature, the first line of its
   docstring and ``...``; a class its header, docstring line, and its methods' signatures; a
   module-level constant its assignment line; an imported module (``import pkg.mod as m``;
   ``m.name`` near the cursor) the definitions used through it, else its outline;
3. the most recently edited other files of the project (``recent``: the editor's order, or
   modification times) add their outline (signatures only) last.

Everything is stubs, never whole bodies: they are small, so many fit in the budget. The
pieces come most important first: the context manager keeps them in order until its budget
for related code is used.

This module parses with the stdlib ``ast`` (files with syntax errors add nothing), so the
training data can be built where tree-sitter is not installed (the GPU machine);
``assistant.repo.RepoIndex`` is the same index with tree-sitter finding the scopes and imports
(it reads files being edited, which may not parse). Both render through the functions here,
so a model trained on these prompts sees at inference exactly the text it learned from.
``fit_related`` is the token layout of the pieces in a completion prompt (the context
manager's related slot).
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "env", ".tox", ".nox", "node_modules",
             "build", "dist", ".mypy_cache", ".pytest_cache", ".ruff_cache", "site-packages", ".eggs"}
MAX_FILES = 5000
MAX_FILE_BYTES = 500_000
_IDENT = re.compile(r"[A-Za-z_]\w*")
_ATTR = re.compile(r"\b([A-Za-z_]\w*)\.([A-Za-z_]\w*)")


@dataclass
class Definition:
    name: str
    kind: str  # "function" | "class" | "variable" | "module"
    path: str  # relative to the root
    stub: str  # what goes into the prompt


@dataclass
class ImportedName:
    local: str  # the name bound in the document
    module_file: str  # the project file it comes from (relative)
    attr: str | None  # the name in that module (None: the module itself)


@dataclass
class ScopeInfo:
    """What the stubs need of a function or class definition (0-based lines)."""

    kind: str  # "function" | "class"
    name: str
    qualname: str
    start_line: int  # the ``def``/``class`` line (decorators excluded)
    signature_end_line: int  # last line of the header
    indent: str
    docstring: str | None = None  # the docstring's literal text (quotes included)
    parent: str | None = None  # qualname of the enclosing scope


@dataclass
class _FileInfo:
    key: tuple[int, int]
    defs: dict[str, Definition] = field(default_factory=dict)
    outline: str = ""


# ----------------------------------------------------------------------------- rendering
def first_line_of_docstring(doc: str | None) -> str | None:
    if not doc:
        return None
    t = doc.strip()
    for p in ('"""', "'''", 'r"""', "r'''", '"', "'"):
        if t.startswith(p):
            t = t[len(p):]
            break
    first = t.strip().split("\n")[0].strip().rstrip("\"'").strip()
    return first or None


def _header(src_lines: list[str], s: ScopeInfo, indent: str = "") -> list[str]:
    head = [ln.rstrip() for ln in src_lines[s.start_line:s.signature_end_line + 1]]
    base = len(s.indent)
    return [indent + ln[base:] if ln[:base].strip() == "" else indent + ln.strip() for ln in head]


def function_stub(src_lines: list[str], s: ScopeInfo, indent: str = "", doc: bool = True) -> str:
    head = _header(src_lines, s, indent)
    body = indent + "    "
    first = first_line_of_docstring(s.docstring) if doc else None
    if head and head[-1].rstrip().endswith(":") and not first and len(head) == 1:
        return head[0] + " ..."
    out = list(head)
    if first:
        out.append(f'{body}"""{first}"""')
    out.append(body + "...")
    return "\n".join(out)


def class_stub(src_lines: list[str], s: ScopeInfo, methods: list[ScopeInfo], max_methods: int = 12) -> str:
    out = _header(src_lines, s)
    first = first_line_of_docstring(s.docstring)
    if first:
        out.append(f'    """{first}"""')
    shown = [m for m in methods if not m.name.startswith("_") or m.name in ("__init__", "__call__")]
    for m in shown[:max_methods]:
        out.append(function_stub(src_lines, m, "    ", doc=False))
    if len(out) == 1:
        out.append("    ...")
    return "\n".join(out)


def variable_lines(source: str) -> dict[str, str]:
    """Module-level ``NAME = value`` / ``NAME: type = value`` lines that fit on one line."""
    out: dict[str, str] = {}
    for ln in source.split("\n"):
        m = re.match(r"([A-Za-z_]\w*)\s*(?::[^=]+)?=(?!=)\s*(.*)$", ln)
        if m and len(ln) <= 120 and not ln.rstrip().endswith(("(", "[", "{", "\\")):
            out.setdefault(m.group(1), ln.rstrip())
    return out


def analyse_scopes(source: str, rel: str, scopes: list) -> tuple[dict[str, Definition], str]:
    """(top-level definitions by name, outline of the file's signatures) from ``scopes``
    (every function and class of the file in source order, outer before inner: ``ScopeInfo``
    or anything with the same attributes)."""
    src_lines = source.split("\n")
    defs: dict[str, Definition] = {}
    outline: list[str] = []
    for s in scopes:
        if s.parent is not None:
            continue
        if s.kind == "function":
            stub = function_stub(src_lines, s)
            outline.append(function_stub(src_lines, s, doc=False))
        else:
            methods = [m for m in scopes if m.parent == s.qualname and m.kind == "function"]
            stub = class_stub(src_lines, s, methods)
            outline.append(_header(src_lines, s)[0] + " ...")
        defs.setdefault(s.name, Definition(s.name, s.kind, rel, stub))
    for name, line in variable_lines(source).items():
        defs.setdefault(name, Definition(name, "variable", rel, line))
    return defs, "\n".join(outline)


def fit_related(tok, count, items: list[tuple[str, str]], budget: int,
                sep: bool = True) -> tuple[list[int], list[str]]:  # fmt: skip
    """Related files, in order, each from its top, within ``budget`` tokens (exact): the token
    layout of the ``related`` slot of a completion prompt (``assistant.context.build_context``).

    Each piece is ``# path`` + its lines + a newline, after a ``<|file_sep|>`` token (``sep``,
    when the tokenizer has one), or without it (repository context) followed by a newline.
    ``count(text)`` is the token count of ``text``. Returns (ids, notes on what was cut)."""
    if not items:
        return [], []
    has_sep = sep and getattr(tok, "has_special", lambda _n: True)("file_sep")
    sep_id = tok.special_id("file_sep") if has_sep else None  # without one, the "# path" lines separate files
    nl_ids = [] if has_sep else tok.encode("\n")
    ids: list[int] = []
    notes: list[str] = []
    left = budget - 1  # the separator before the document's prefix
    for path, text in items:
        head = f"# {path}\n"
        if left <= count(head) + 1:
            notes.append(f"dropped related file {path}")
            left = -1
            continue
        kept: list[str] = []
        used = count(head) + 1
        file_lines = text.split("\n")
        for x in file_lines:
            c = count(x + "\n")
            if used + c > left:
                break
            kept.append(x)
            used += c
        piece = tok.encode(head + "\n".join(kept) + "\n")
        while kept and len(piece) + 1 > left:
            kept.pop()
            piece = tok.encode(head + "\n".join(kept) + "\n")
        if len(piece) + 1 > left:
            notes.append(f"dropped related file {path}")
            continue
        if len(kept) < len(file_lines):
            notes.append(f"related file {path}: kept {len(kept)} of {len(file_lines)} lines")
        ids += [sep_id, *piece] if sep_id is not None else [*piece, *nl_ids]
        left -= len(piece) + 1
    if ids and sep_id is not None:
        ids.append(sep_id)
    return ids, notes


# ----------------------------------------------------------------------------- parsing (stdlib ast)
def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _parse(source: str) -> ast.Module | None:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return None


def ast_scopes(source: str, tree: ast.Module | None = None) -> list[ScopeInfo]:
    """Every function and class definition (ast), in source order, outer before inner; the
    same traversal as ``assistant.code.scopes`` (definitions inside if/try/with/for/while/match
    blocks count at their enclosing level). [] when the source does not parse."""
    tree = tree or _parse(source)
    if tree is None:
        return []
    lines = source.split("\n")
    out: list[ScopeInfo] = []

    def visit(stmts: list[ast.stmt], parent: ScopeInfo | None) -> None:
        for st in stmts:
            if isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                start = st.lineno - 1
                body0 = st.body[0].lineno - 1 if st.body else start
                sig_end = start if body0 <= start else body0 - 1
                while sig_end > start and (not lines[sig_end].strip() or lines[sig_end].lstrip().startswith("#")):
                    sig_end -= 1
                doc = None
                if st.body and isinstance(st.body[0], ast.Expr) and (
                        isinstance(st.body[0].value, ast.JoinedStr) or (
                        isinstance(st.body[0].value, ast.Constant)
                        and isinstance(st.body[0].value.value, str | bytes))):
                    doc = ast.get_source_segment(source, st.body[0].value)
                kind = "class" if isinstance(st, ast.ClassDef) else "function"
                qual = f"{parent.qualname}.{st.name}" if parent else st.name
                scope = ScopeInfo(kind, st.name, qual, start, sig_end, _indent_of(lines[start]) if start < len(lines)
                                  else "", doc, parent.qualname if parent else None)
                out.append(scope)
                visit(st.body, scope)
            elif isinstance(st, ast.If):
                visit(st.body, parent)
                visit(st.orelse, parent)
            elif isinstance(st, ast.Try | getattr(ast, "TryStar", ast.Try)):
                visit(st.body, parent)
                for h in st.handlers:
                    visit(h.body, parent)
                visit(st.orelse, parent)
                visit(st.finalbody, parent)
            elif isinstance(st, ast.With | ast.AsyncWith):
                visit(st.body, parent)
            elif isinstance(st, ast.For | ast.AsyncFor | ast.While):
                visit(st.body, parent)
                visit(st.orelse, parent)
            elif isinstance(st, ast.Match):
                for c in st.cases:
                    visit(c.body, parent)

    visit(tree.body, None)
    return out


def ast_imports(source: str, tree: ast.Module | None = None) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of ``source`` in the order ``assistant.repo`` finds them with
    tree-sitter (the module's own first, then those in if/else, try/except/else/finally, with,
    function and class bodies, inner blocks first as a stack pops them; ``elif`` branches,
    loops and ``from __future__`` are not searched). [] when the source does not parse."""
    tree = tree or _parse(source)
    if tree is None:
        return []
    lines = source.split("\n")
    out: list[ast.Import | ast.ImportFrom] = []

    def is_elif(node: ast.If) -> bool:
        ln = node.lineno - 1
        return 0 <= ln < len(lines) and lines[ln].lstrip().startswith("elif")

    def children(item) -> list:
        """The searched children of a tree-sitter node, as ("block", stmts) or ("node", stmt)."""
        kind, x = item
        if kind == "block":
            return [("node", s) for s in x]
        st = x
        if isinstance(st, ast.If):
            res = [("block", st.body)]
            cur = st
            while len(cur.orelse) == 1 and isinstance(cur.orelse[0], ast.If) and is_elif(cur.orelse[0]):
                cur = cur.orelse[0]  # elif clauses: not searched; a final else is the if's child
            if cur.orelse:
                res.append(("block", cur.orelse))
            return res
        if isinstance(st, ast.Try | getattr(ast, "TryStar", ast.Try)):
            res = [("block", st.body)] + [("block", h.body) for h in st.handlers]
            if st.orelse:
                res.append(("block", st.orelse))
            if st.finalbody:
                res.append(("block", st.finalbody))
            return res
        if isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.With | ast.AsyncWith):
            return [("block", st.body)]
        return []

    searched = (ast.If, ast.Try, getattr(ast, "TryStar", ast.Try), ast.FunctionDef, ast.AsyncFunctionDef,
                ast.ClassDef, ast.With, ast.AsyncWith)
    stack = [("block", tree.body)]
    while stack:
        item = stack.pop()
        for kind, c in children(item):
            if kind == "block":
                stack.append((kind, c))
            elif isinstance(c, ast.Import) or (isinstance(c, ast.ImportFrom) and c.module != "__future__"):
                out.append(c)
            elif isinstance(c, searched):
                stack.append((kind, c))
    return out


def analyse_file(source: str, rel: str) -> tuple[dict[str, Definition], str]:
    """(top-level definitions by name, outline of the file's signatures), parsed with ``ast``."""
    return analyse_scopes(source, rel, ast_scopes(source))


# ----------------------------------------------------------------------------- the index
class RepoIndex:
    """The Python files of one project and their top-level definitions (cached per file).

    Subclasses change how a file is parsed (``analyse``, ``imports``); the resolution and the
    context are the same."""

    def __init__(self, root: str | os.PathLike, max_files: int = MAX_FILES):
        self.root = Path(root).resolve()
        self.max_files = max_files
        self._files: list[str] | None = None
        self._info: dict[str, _FileInfo] = {}

    # -- parsing (overridden by assistant.repo with tree-sitter) ---------------------------
    def analyse(self, source: str, rel: str) -> tuple[dict[str, Definition], str]:
        return analyse_file(source, rel)

    def imports(self, source: str) -> list[ast.Import | ast.ImportFrom]:
        return ast_imports(source)

    # -- files -------------------------------------------------------------------------
    def files(self) -> list[str]:
        """Relative paths of the project's Python files (sorted; at most ``max_files``)."""
        if self._files is None:
            found: list[str] = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
                for f in sorted(filenames):
                    if f.endswith(".py"):
                        found.append(os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/"))
                        if len(found) >= self.max_files:
                            break
                if len(found) >= self.max_files:
                    break
            self._files = found
        return self._files

    def refresh(self) -> None:
        """Forget the file list (a file was created or deleted); definitions re-read on change anyway."""
        self._files = None

    def rel(self, path: str | os.PathLike | None) -> str | None:
        if path is None:
            return None
        p = Path(path)
        if not p.is_absolute():
            p = self.root / p
        try:
            return p.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return None

    def _read(self, rel: str) -> str | None:
        p = self.root / rel
        try:
            if p.stat().st_size > MAX_FILE_BYTES:
                return None
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def info(self, rel: str) -> _FileInfo | None:
        p = self.root / rel
        try:
            st = p.stat()
        except OSError:
            return None
        key = (st.st_size, st.st_mtime_ns)
        cached = self._info.get(rel)
        if cached is not None and cached.key == key:
            return cached
        text = self._read(rel)
        if text is None:
            return None
        defs, outline = self.analyse(text, rel)
        info = _FileInfo(key, defs, outline)
        self._info[rel] = info
        return info

    # -- import resolution ------------------------------------------------------------------
    def module_file(self, module: str | None, level: int = 0, from_rel: str | None = None) -> str | None:
        """The project file of ``module`` (``level`` leading dots, relative to ``from_rel``'s package)."""
        parts = [p for p in (module or "").split(".") if p]
        bases: list[Path] = []
        if level > 0:
            if from_rel is None:
                return None
            base = (self.root / from_rel).parent
            for _ in range(level - 1):
                base = base.parent
            bases.append(base)
        else:
            if not parts:
                return None
            bases += [self.root, self.root / "src"]
            # a project whose root is the package itself (``import pkg.x`` inside pkg/)
            if parts[0] == self.root.name:
                bases.append(self.root.parent)
        for base in bases:
            target = base.joinpath(*parts) if parts else base
            for cand in (target.with_suffix(".py") if parts else None, target / "__init__.py"):
                if cand is not None and cand.is_file():
                    try:
                        return cand.resolve().relative_to(self.root).as_posix()
                    except ValueError:
                        continue
        return None

    def imported_names(self, source: str, rel: str | None) -> list[ImportedName]:
        """Names the document binds by importing from project files, in source order."""
        out: list[ImportedName] = []
        for st in self.imports(source):
            if isinstance(st, ast.Import):
                for a in st.names:
                    f = self.module_file(a.name, 0, rel)
                    if f is not None:
                        out.append(ImportedName(a.asname or a.name, f, None))
            else:
                mod_file = self.module_file(st.module, st.level, rel)
                for a in st.names:
                    if a.name == "*":
                        continue
                    local = a.asname or a.name
                    sub = self.module_file(((st.module or "") + "." + a.name).lstrip("."), st.level, rel) \
                        if st.level or st.module else None
                    if sub is not None and (mod_file is None or a.name not in self._defs(mod_file)):
                        out.append(ImportedName(local, sub, None))
                    elif mod_file is not None:
                        out.append(ImportedName(local, mod_file, a.name))
        return [x for x in out if x.module_file != rel]

    def _defs(self, rel: str) -> dict[str, Definition]:
        info = self.info(rel)
        return info.defs if info is not None else {}

    def definition(self, rel: str, name: str, _seen: frozenset = frozenset()) -> Definition | None:
        """``name`` as defined in project file ``rel``, following re-exports (``from .x import name``)."""
        d = self._defs(rel).get(name)
        if d is not None:
            return d
        if rel in _seen or len(_seen) > 4:
            return None
        text = self._read(rel)
        if text is None:
            return None
        for imp in self.imported_names(text, rel):
            if imp.local == name and imp.attr is not None:
                return self.definition(imp.module_file, imp.attr, _seen | {rel})
        return None

    # -- the context -------------------------------------------------------------------------
    def recent_files(self, n: int = 2, exclude: str | None = None) -> list[str]:
        """The ``n`` most recently modified project files (not ``exclude``)."""
        stamped = []
        for rel in self.files():
            if rel == exclude:
                continue
            try:
                stamped.append(((self.root / rel).stat().st_mtime_ns, rel))
            except OSError:
                continue
        return [r for _, r in sorted(stamped, reverse=True)[:n]]

    def context_for(self, path: str | os.PathLike | None, source: str, line: int, *, window: int = 30,
                    max_defs: int = 24, recent: list[str] | None = None, n_recent: int = 1,
                    imports_source: str | None = None,
                    ) -> tuple[list[tuple[str, str]], list[str]]:
        """(related pieces ``(path, stub text)``, names added) for a cursor at 0-based ``line``.

        ``recent``: paths of recently edited files, most recent first (default: by mtime).
        ``imports_source``: read the imports from this text instead of ``source`` (the
        training data passes the whole file while ``source`` has the cursor line blanked).
        """
        rel = self.rel(path)
        imported = self.imported_names(source if imports_source is None else imports_source, rel)
        if not imported and not recent and n_recent <= 0:
            return [], []
        by_local = {}
        for imp in imported:
            by_local.setdefault(imp.local, imp)
        lines = source.split("\n")
        lo, hi = max(0, line - window), min(len(lines), line + window // 3 + 1)
        # names used near the cursor, nearest line first
        order: list[tuple[str, str | None]] = []
        seen: set[tuple[str, str | None]] = set()
        for i in sorted(range(lo, hi), key=lambda k: (abs(k - line), k)):
            ln = lines[i]
            for m in _ATTR.finditer(ln):
                key = (m.group(1), m.group(2))
                if m.group(1) in by_local and by_local[m.group(1)].attr is None and key not in seen:
                    seen.add(key)
                    order.append(key)
            for m in _IDENT.finditer(ln):
                key = (m.group(0), None)
                if m.group(0) in by_local and key not in seen:
                    seen.add(key)
                    order.append(key)
        for imp in imported:  # then every other imported name, in import order
            key = (imp.local, None)
            if key not in seen:
                seen.add(key)
                order.append(key)

        pieces: dict[str, list[str]] = {}
        added: list[str] = []
        used_stubs: set[str] = set()
        for local, attr in order:
            if len(added) >= max_defs:
                break
            imp = by_local[local]
            if attr is not None:  # module.attr
                d = self.definition(imp.module_file, attr)
                label = f"{local}.{attr}"
            elif imp.attr is None:  # a module used as a whole: its outline
                info = self.info(imp.module_file)
                d = Definition(local, "module", imp.module_file, info.outline) if info and info.outline else None
                label = local
            else:
                d = self.definition(imp.module_file, imp.attr)
                label = local
            if d is None or not d.stub or d.stub in used_stubs:
                continue
            used_stubs.add(d.stub)
            pieces.setdefault(d.path, []).append(d.stub)
            added.append(label)
        out = [(p, "\n\n".join(stubs)) for p, stubs in pieces.items()]
        recents = [self.rel(r) for r in recent] if recent is not None else self.recent_files(n_recent, rel)
        for r in [x for x in recents if x and x != rel and x not in pieces][:n_recent]:
            info = self.info(r)
            if info is not None and info.outline:
                out.append((r, info.outline))
                added.append(f"outline of {r}")
        return out, added
