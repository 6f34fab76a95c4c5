"""Tree-sitter helpers over Python source: functions, classes, scopes, docstrings, lines.

All line numbers are 0-based and count ``"\\n"``-separated lines (``source.split("\\n")``),
which is how tree-sitter counts rows. Parsing is cached on the source text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import tree_sitter_python
from tree_sitter import Language, Node, Parser, Tree

PY_LANGUAGE = Language(tree_sitter_python.language())
_PARSER = Parser(PY_LANGUAGE)

STYLES = ("google", "numpy", "rest", "plain")


@lru_cache(maxsize=8)
def parse(source: str) -> Tree:
    """The tree-sitter tree of ``source`` (cached for the last few sources)."""
    return _PARSER.parse(source.encode("utf-8", "surrogatepass"))


def has_errors(source: str) -> bool:
    """True when tree-sitter found syntax errors."""
    return parse(source).root_node.has_error


def lines(source: str) -> list[str]:
    return source.split("\n")


@dataclass
class Scope:
    """A function or class definition."""

    kind: str  # "function" | "class"
    name: str
    qualname: str  # "Outer.method"
    start_line: int  # first line of the definition (decorators excluded)
    end_line: int  # last line (inclusive)
    body_start_line: int  # first line of the body block
    indent: str  # indentation of the ``def``/``class`` line
    body_indent: str  # indentation of the body's first statement
    decorated_start: int = -1  # first decorator line, or start_line
    docstring: str | None = None  # the docstring's literal text (quotes included)
    docstring_lines: tuple[int, int] | None = None  # (first, last) line of the docstring
    params: list[str] = field(default_factory=list)  # function parameters (self/cls excluded)
    param_types: dict[str, str] = field(default_factory=dict)
    returns_value: bool = False  # a ``return <expr>`` or ``yield`` in its own body
    raises: list[str] = field(default_factory=list)  # exception names raised in its own body
    parent: str | None = None  # qualname of the enclosing scope

    @property
    def signature_end_line(self) -> int:
        """Last line of the header (``def ...:`` may span lines)."""
        return max(self.start_line, self.body_start_line - 1) if self.body_start_line > self.start_line \
            else self.start_line

    def contains(self, line: int) -> bool:
        return self.start_line <= line <= self.end_line


# Alias used by docs/interfaces.md wording: ``functions(source)`` returns these.
FunctionInfo = Scope


def _text(node: Node) -> str:
    return node.text.decode("utf-8", "replace") if node.text is not None else ""


def _docstring_node(body: Node | None) -> Node | None:
    if body is None:
        return None
    for child in body.named_children:
        if child.type == "comment":
            continue
        if child.type == "expression_statement" and child.named_child_count == 1 \
                and child.named_children[0].type in ("string", "concatenated_string"):
            return child.named_children[0]
        return None
    return None


def _own_body_nodes(node: Node):
    """Descendants of ``node`` not inside a nested function/class/lambda."""
    stack = list(node.named_children)
    while stack:
        n = stack.pop()
        yield n
        if n.type in ("function_definition", "class_definition", "lambda", "decorated_definition"):
            continue
        stack.extend(n.named_children)


def _params(params_node: Node | None) -> tuple[list[str], dict[str, str]]:
    names: list[str] = []
    types: dict[str, str] = {}
    if params_node is None:
        return names, types
    for p in params_node.named_children:
        name = None
        typ = None
        if p.type == "identifier":
            name = _text(p)
        elif p.type in ("typed_parameter", "typed_default_parameter", "default_parameter"):
            ident = p.child_by_field_name("name")
            if ident is None:
                ident = next((c for c in p.named_children if c.type in ("identifier", "list_splat_pattern",
                                                                        "dictionary_splat_pattern")), None)
            name = _text(ident) if ident is not None else None
            t = p.child_by_field_name("type")
            typ = _text(t) if t is not None else None
        elif p.type == "list_splat_pattern":
            name = "*" + _text(p.named_children[0]) if p.named_children else None
        elif p.type == "dictionary_splat_pattern":
            name = "**" + _text(p.named_children[0]) if p.named_children else None
        if name and name not in ("self", "cls", "*", "/"):
            names.append(name)
            if typ:
                types[name] = typ
    return names, types


def _line_indent(src_lines: list[str], line: int) -> str:
    if 0 <= line < len(src_lines):
        s = src_lines[line]
        return s[: len(s) - len(s.lstrip(" \t"))]
    return ""


def scopes(source: str) -> list[Scope]:
    """Every function and class definition, in source order (outer before inner)."""
    return list(_scopes_cached(source))


@lru_cache(maxsize=8)
def _scopes_cached(source: str) -> tuple[Scope, ...]:
    tree = parse(source)
    src_lines = lines(source)
    out: list[Scope] = []

    def visit(node: Node, parent: Scope | None) -> None:
        for child in node.named_children:
            target = child
            deco_start = None
            if child.type == "decorated_definition":
                deco_start = child.start_point[0]
                target = child.child_by_field_name("definition") or child
            if target.type in ("function_definition", "class_definition"):
                name_node = target.child_by_field_name("name")
                name = _text(name_node) if name_node is not None else "<anonymous>"
                body = target.child_by_field_name("body")
                kind = "function" if target.type == "function_definition" else "class"
                qual = f"{parent.qualname}.{name}" if parent else name
                body_start = body.start_point[0] if body is not None else target.start_point[0]
                scope = Scope(
                    kind=kind, name=name, qualname=qual,
                    start_line=target.start_point[0],
                    end_line=max(target.start_point[0],
                                 target.end_point[0] - (1 if target.end_point[1] == 0 else 0)),
                    body_start_line=body_start,
                    indent=_line_indent(src_lines, target.start_point[0]),
                    body_indent=_line_indent(src_lines, body_start) if body_start > target.start_point[0]
                    else _line_indent(src_lines, target.start_point[0]) + "    ",
                    decorated_start=deco_start if deco_start is not None else target.start_point[0],
                    parent=parent.qualname if parent else None,
                )
                doc = _docstring_node(body)
                if doc is not None:
                    scope.docstring = _text(doc)
                    scope.docstring_lines = (doc.start_point[0], doc.end_point[0])
                if kind == "function":
                    scope.params, scope.param_types = _params(target.child_by_field_name("parameters"))
                    if body is not None:
                        for n in _own_body_nodes(body):
                            if n.type == "return_statement" and n.named_child_count > 0:
                                scope.returns_value = True
                            elif n.type == "yield":
                                scope.returns_value = True
                            elif n.type == "raise_statement" and n.named_child_count > 0:
                                exc = n.named_children[0]
                                if exc.type == "call":
                                    exc = exc.child_by_field_name("function") or exc
                                name_txt = _text(exc)
                                if re.fullmatch(r"[A-Za-z_][\w.]*", name_txt) and name_txt not in scope.raises:
                                    scope.raises.append(name_txt)
                out.append(scope)
                if body is not None:
                    visit(body, scope)
            else:
                # functions may hide inside if/try/with blocks at any level
                if child.type in ("if_statement", "try_statement", "with_statement", "for_statement",
                                  "while_statement", "block", "else_clause", "elif_clause", "except_clause",
                                  "finally_clause", "match_statement", "case_clause"):
                    visit(child, parent)

    visit(tree.root_node, None)
    return tuple(out)


def functions(source: str) -> list[Scope]:
    """Every function (methods and nested functions included), in source order."""
    return [s for s in _scopes_cached(source) if s.kind == "function"]


def task_functions(source: str) -> list[Scope]:
    """The functions the tasks run for (:func:`model.formats.is_task_function`: module-level
    functions and methods, not functions nested in functions), in source order. The one
    function finder of the review, the LSP diagnostics and the chat."""
    from model.formats import is_task_function

    kinds = {s.qualname: s.kind for s in _scopes_cached(source)}
    parents = {s.qualname: s.parent for s in _scopes_cached(source)}
    out = []
    for f in functions(source):
        enclosing, p = [], f.parent
        while p is not None:
            enclosing.append(kinds.get(p, "class"))
            p = parents.get(p)
        if is_task_function(enclosing[::-1]):
            out.append(f)
    return out


def classes(source: str) -> list[Scope]:
    return [s for s in _scopes_cached(source) if s.kind == "class"]


def enclosing_scopes(source: str, line: int) -> list[Scope]:
    """The chain of definitions containing ``line``, outermost first."""
    return [s for s in _scopes_cached(source) if s.start_line <= line <= s.end_line]


def function_at(source: str, line: int) -> Scope | None:
    """The innermost function containing ``line`` (its decorators included), or None."""
    best = None
    for s in _scopes_cached(source):
        if s.kind == "function" and min(s.decorated_start, s.start_line) <= line <= s.end_line:
            best = s  # source order: later matches are nested deeper
    return best


def find_function(source: str, name: str) -> Scope | None:
    """A function by qualified name (``Class.method``) or, failing that, by plain name."""
    funcs = functions(source)
    for f in funcs:
        if f.qualname == name:
            return f
    for f in funcs:
        if f.name == name:
            return f
    return None


def import_lines(source: str) -> list[int]:
    """Lines of top-level (and nested) import statements."""
    return list(_import_lines_cached(source))


@lru_cache(maxsize=8)
def _import_lines_cached(source: str) -> tuple[int, ...]:
    tree = parse(source)
    out: list[int] = []
    stack = [tree.root_node]
    while stack:
        n = stack.pop()
        for c in n.named_children:
            if c.type in ("import_statement", "import_from_statement", "future_import_statement"):
                out.extend(range(c.start_point[0], c.end_point[0] + 1))
            elif c.type in ("if_statement", "try_statement", "block", "else_clause", "except_clause",
                            "finally_clause"):
                stack.append(c)
    return tuple(sorted(set(out)))


# -- docstring style -----------------------------------------------------------------
_GOOGLE = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Yields|Raises|Attributes|Examples?|Note)\s*:\s*$",
                     re.MULTILINE)
_NUMPY = re.compile(r"^\s*(Parameters|Returns|Yields|Raises|Attributes|See Also|Notes|Examples)\s*\n\s*-{3,}\s*$",
                    re.MULTILINE)
_REST = re.compile(r"^\s*:(param|type|returns?|rtype|raises?|ivar|var)\b[^:]*:", re.MULTILINE)


def docstring_style_of(text: str) -> str | None:
    """The style of one docstring, or None when it has no sections (plain)."""
    if _NUMPY.search(text):
        return "numpy"
    if _REST.search(text):
        return "rest"
    if _GOOGLE.search(text):
        return "google"
    return None


def docstring_style(source: str, default: str = "google") -> str:
    """The docstring style a file uses: the most common among its docstrings' sections.

    A file whose docstrings have no sections at all is ``"plain"``; a file without
    docstrings gets ``default``.
    """
    counts = {"google": 0, "numpy": 0, "rest": 0}
    seen = 0
    for s in _scopes_cached(source):
        if s.docstring:
            seen += 1
            style = docstring_style_of(s.docstring)
            if style:
                counts[style] += 1
    if not seen:
        return default
    best = max(counts, key=lambda k: counts[k])
    return best if counts[best] else "plain"
