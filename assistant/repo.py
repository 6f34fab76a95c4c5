"""Repository context for completion: definitions of names the cursor's code uses from other files.

``RepoIndex(root)`` indexes the Python files of a project (lazily, cached per file on its
size and mtime). ``index.context_for(path, source, line)`` answers, for a cursor in
``path``, a list of ``(path, text)`` pieces for the context manager's ``related`` slot:

1. the imports of the document (found with tree-sitter, each statement read with ``ast``)
   are resolved to files of the project: relative imports against the document's package,
   absolute ones against the project root (and a ``src/`` layout);
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
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from assistant import code as codemod

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
class _FileInfo:
    key: tuple[int, int]
    defs: dict[str, Definition] = field(default_factory=dict)
    outline: str = ""


def _first_line_of_docstring(doc: str | None) -> str | None:
    if not doc:
        return None
    t = doc.strip()
    for p in ('"""', "'''", 'r"""', "r'''", '"', "'"):
        if t.startswith(p):
            t = t[len(p):]
            break
    first = t.strip().split("\n")[0].strip().rstrip("\"'").strip()
    return first or None


def _header(src_lines: list[str], s: codemod.Scope, indent: str = "") -> list[str]:
    head = [ln.rstrip() for ln in src_lines[s.start_line:s.signature_end_line + 1]]
    base = len(s.indent)
    return [indent + ln[base:] if ln[:base].strip() == "" else indent + ln.strip() for ln in head]


def _function_stub(src_lines: list[str], s: codemod.Scope, indent: str = "", doc: bool = True) -> str:
    head = _header(src_lines, s, indent)
    body = indent + "    "
    first = _first_line_of_docstring(s.docstring) if doc else None
    if head and head[-1].rstrip().endswith(":") and not first and len(head) == 1:
        return head[0] + " ..."
    out = list(head)
    if first:
        out.append(f'{body}"""{first}"""')
    out.append(body + "...")
    return "\n".join(out)


def _class_stub(src_lines: list[str], s: codemod.Scope, methods: list[codemod.Scope], max_methods: int = 12) -> str:
    out = _header(src_lines, s)
    first = _first_line_of_docstring(s.docstring)
    if first:
        out.append(f'    """{first}"""')
    shown = [m for m in methods if not m.name.startswith("_") or m.name in ("__init__", "__call__")]
    for m in shown[:max_methods]:
        out.append(_function_stub(src_lines, m, "    ", doc=False))
    if len(out) == 1:
        out.append("    ...")
    return "\n".join(out)


def _variable_lines(source: str) -> dict[str, str]:
    """Module-level ``NAME = value`` / ``NAME: type = value`` lines that fit on one line."""
    out: dict[str, str] = {}
    for ln in source.split("\n"):
        m = re.match(r"([A-Za-z_]\w*)\s*(?::[^=]+)?=(?!=)\s*(.*)$", ln)
        if m and len(ln) <= 120 and not ln.rstrip().endswith(("(", "[", "{", "\\")):
            out.setdefault(m.group(1), ln.rstrip())
    return out


def analyse_file(source: str, rel: str) -> tuple[dict[str, Definition], str]:
    """(top-level definitions by name, outline of the file's signatures)."""
    src_lines = source.split("\n")
    scopes = codemod.scopes(source)
    defs: dict[str, Definition] = {}
    outline: list[str] = []
    for s in scopes:
        if s.parent is not None:
            continue
        if s.kind == "function":
            stub = _function_stub(src_lines, s)
            outline.append(_function_stub(src_lines, s, doc=False))
        else:
            methods = [m for m in scopes if m.parent == s.qualname and m.kind == "function"]
            stub = _class_stub(src_lines, s, methods)
            outline.append(_header(src_lines, s)[0] + " ...")
        defs.setdefault(s.name, Definition(s.name, s.kind, rel, stub))
    for name, line in _variable_lines(source).items():
        defs.setdefault(name, Definition(name, "variable", rel, line))
    return defs, "\n".join(outline)


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


class RepoIndex:
    """The Python files of one project and their top-level definitions (cached per file)."""

    def __init__(self, root: str | os.PathLike, max_files: int = MAX_FILES):
        self.root = Path(root).resolve()
        self.max_files = max_files
        self._files: list[str] | None = None
        self._info: dict[str, _FileInfo] = {}

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
        defs, outline = analyse_file(text, rel)
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
        for st in _imports(source):
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
                    ) -> tuple[list[tuple[str, str]], list[str]]:
        """(related pieces ``(path, stub text)``, names added) for a cursor at 0-based ``line``.

        ``recent``: paths of recently edited files, most recent first (default: by mtime).
        """
        rel = self.rel(path)
        imported = self.imported_names(source, rel)
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
