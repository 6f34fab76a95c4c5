# Longer than 600 lines because the mutation operators, facts-to-reasoning writers and the
# parallel builder are one pipeline whose pieces are tested together; the operators (~350 lines) are
# the next file to split out.
"""Synthetic task data for the comment, debug and explain tasks, written by programs from facts they know.

``moecoder data tasks CORPUS_DIR --tokenizer TOK --out DIR [--max-functions N] [--workers N]``

Reads the corpus shards (``CORPUS/{train,valid,test}/shard-*.jsonl``, records ``{"text", "path",
"package"}``), pulls every function out of every file with :mod:`ast`, and writes three kinds of
examples, keeping the corpus's split (which is by package):

* ``comment``: a function that has a docstring, shown without it; the reasoning lists facts parsed
  from the code (parameters, returns, raises, notable calls); the answer is the docstring's summary
  (plus its Args/Returns/Raises sections, at most ~300 characters).
* ``explain`` (low rate): the same input, the same facts, the docstring's summary as the answer.
* ``debug``: BugLab-style single-line rewrites of real functions (variable misuse, wrong binary /
  comparison / boolean operator, off-by-one literal, swapped call arguments, negation added or
  dropped, wrong return value). Rewrites replace exact source segments located by AST positions,
  so the rest of the function keeps its formatting. The answer is ``line N: hint`` / ``fix: ...``
  in :func:`model.formats.number_lines` numbering; at least a third of the debug examples are
  untouched functions whose answer is :data:`model.formats.NO_ISSUE`.

Functions whose body also occurs in the evaluation data (``shared/eval``: MBPP, QuixBugs) are
skipped. Output: ``DIR/{split}.jsonl`` (raw examples) and the packed token layout of
``docs/interfaces.md`` (``{split}.bin``, ``{split}.idx``, ``meta.json`` with ``"kind": "tasks"``),
plus ``{split}.tgt`` (int64 ``.npy``: for each document, the offset where its target starts).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import sys
import textwrap
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from model import docstrings
from model.docstrings import MAX_ANSWER_CHARS
from model.formats import NO_ISSUE, Finding, format_finding, is_task_function, number_lines
from model.progress import Progress

SPLITS = ("train", "valid", "test")
TASKS = ("comment", "debug", "explain")

MAX_LINES = 60
MAX_CHARS = 2400
CLEAN_SHARE = 0.4  # share of debug examples left untouched ("no issue"); must stay >= 1/3
EXPLAIN_SHARE = 0.1  # share of documented functions that become explain instead of comment

MUTATIONS = (
    "variable_misuse",
    "binary_operator",
    "comparison",
    "boolean_operator",
    "off_by_one",
    "swapped_arguments",
    "negation",
    "wrong_return",
)


# --------------------------------------------------------------------------- functions


def _parse(code: str) -> ast.Module:
    """``ast.parse`` without the SyntaxWarnings that old code (invalid escapes) emits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(code)


@dataclass
class Function:
    """One function pulled out of a file, dedented so that its ``def`` starts at column 0."""

    name: str
    code: str  # the function as written (decorators included), dedented
    node: ast.FunctionDef | ast.AsyncFunctionDef  # parsed from ``code`` (positions refer to it)
    docstring: str | None
    path: str = ""
    package: str = ""


def _func_nodes(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """The task functions (:func:`model.formats.is_task_function`): module-level functions
    and methods of (nested) classes, wherever blocks put them; not functions in functions."""
    stack: list[tuple[ast.AST, tuple[str, ...]]] = [(tree, ())]
    while stack:
        node, enclosing = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                if is_task_function(enclosing):
                    yield child  # nothing inside a function is a task function: not descended
            elif isinstance(child, ast.ClassDef):
                stack.append((child, (*enclosing, "class")))
            elif isinstance(child, ast.stmt | ast.excepthandler | ast.match_case):
                stack.append((child, enclosing))  # blocks (if, try, with, for...) are not scopes


def extract_functions(source: str, path: str = "", package: str = "") -> list[Function]:
    """All reasonably small functions of ``source`` that parse on their own after dedenting."""
    try:
        tree = _parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    lines = source.splitlines()
    out: list[Function] = []
    for node in _func_nodes(tree):
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        end = node.end_lineno or node.lineno
        if end - start + 1 > MAX_LINES:
            continue
        code = textwrap.dedent("\n".join(lines[start - 1 : end]))
        if len(code) > MAX_CHARS or "\t" in code:
            continue
        try:
            mod = _parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        if len(mod.body) != 1 or not isinstance(mod.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        fn = mod.body[0]
        out.append(Function(fn.name, code, fn, ast.get_docstring(fn, clean=True), path, package))
    return out


def _docstring_node(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.Expr | None:
    first = fn.body[0] if fn.body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        return first
    return None


def strip_docstring(func: Function) -> str | None:
    """The function's code without its docstring (by source lines), or None if that is not clean."""
    doc = _docstring_node(func.node)
    if doc is None or len(func.node.body) < 2:
        return None
    lines = func.code.split("\n")
    first, last = doc.lineno, doc.end_lineno or doc.lineno
    # the docstring must sit alone on its lines
    if lines[first - 1][: _char_col(lines[first - 1], doc.col_offset)].strip():
        return None
    nxt = func.node.body[1]
    if nxt.lineno <= last:
        return None
    # only the docstring's own lines go (as assistant.tasks does at run time): a blank line after it stays
    code = "\n".join(lines[: first - 1] + lines[last:])
    try:
        _parse(code)
    except SyntaxError:
        return None
    return code


# --------------------------------------------------------------------------- facts


_BORING_CALLS = {
    "len", "str", "int", "float", "bool", "list", "dict", "set", "tuple", "range", "enumerate", "zip",
    "isinstance", "issubclass", "super", "type", "getattr", "setattr", "hasattr", "min", "max", "sorted",
    "repr", "iter", "next", "print", "abs", "any", "all", "map", "filter", "id", "hash", "reversed",
    "frozenset", "bytes", "callable", "object", "vars", "format", "sum", "round",
}  # fmt: skip


def _short(text: str, limit: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unparse(node: ast.AST, limit: int = 48) -> str:
    try:
        return _short(ast.unparse(node), limit)
    except Exception:  # unparse of odd trees
        return "..."


def _own_nodes(fn: ast.AST) -> list[ast.AST]:
    """Nodes of the function's own body (not of nested functions, lambdas or classes), in source order."""
    out: list[ast.AST] = []
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        stack.extend(ast.iter_child_nodes(node))
    out.sort(key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))
    return out


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return names


def _and_list(items: list[str]) -> str:
    items = [f"`{x}`" for x in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class Facts:
    params: list[str]
    returns: list[str]
    return_annotation: str | None
    yields: bool
    raises: list[tuple[str, str | None]]  # (exception, condition)
    calls: list[str]


def function_facts(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Facts:
    nodes = _own_nodes(fn)
    parents: dict[int, ast.AST] = {}
    for node in [fn, *nodes]:
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    returns: list[str] = []
    raises: list[tuple[str, str | None]] = []
    calls: list[str] = []
    yields = False
    for node in nodes:
        if isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                text = _unparse(node.value, 40)
                if text not in returns:
                    returns.append(text)
            elif "None" not in returns:
                returns.append("None")
        elif isinstance(node, ast.Yield | ast.YieldFrom):
            yields = True
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = _dotted(exc)
            if not name:
                continue
            parent = parents.get(id(node))
            cond = None
            if isinstance(parent, ast.If) and node in parent.body:
                cond = _unparse(parent.test, 40)
            if all(r[0] != name for r in raises):
                raises.append((name, cond))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name and name not in _BORING_CALLS and name not in calls and not name.startswith("self.__"):
                calls.append(name)
    ann = _unparse(fn.returns, 40) if fn.returns is not None else None
    return Facts(_params(fn), returns, ann, yields, raises[:2], calls[:3])


def facts_reasoning(facts: Facts) -> str:
    """'Takes `path` and `mode`. Returns `config`. Raises ValueError when `not path`. Calls json.loads.'"""
    parts = []
    parts.append(f"Takes {_and_list(facts.params)}." if facts.params else "Takes no arguments.")
    if facts.yields:
        parts.append("Yields values (a generator).")
    elif facts.returns:
        shown = facts.returns[:2]
        text = " or ".join(f"`{r}`" for r in shown)
        if facts.return_annotation and facts.return_annotation != "None":
            parts.append(f"Returns a `{facts.return_annotation}`: {text}.")
        else:
            parts.append(f"Returns {text}.")
    else:
        parts.append("Returns nothing.")
    for exc, cond in facts.raises:
        parts.append(f"Raises {exc} when `{cond}`." if cond else f"Raises {exc}.")
    if facts.calls:
        parts.append("Calls " + ", ".join(facts.calls) + ".")
    return " ".join(parts)


# --------------------------------------------------------------------------- docstrings

def docstring_target(doc: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """The comment task's answer for ``doc`` (:func:`model.docstrings.target`)."""
    return docstrings.target(doc, limit)


def docstring_summary(doc: str, limit: int = 200) -> str:
    return docstrings.summary(doc, limit)


# --------------------------------------------------------------------------- rewriting


def _char_col(line: str, byte_col: int) -> int:
    """AST column offsets are UTF-8 byte offsets; convert to a str index."""
    if line.isascii():
        return byte_col
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="ignore"))


@dataclass
class Mutation:
    kind: str
    line: int  # 1-based line in the function code
    code: str  # the whole rewritten function
    old_line: str
    new_line: str
    hint: str
    reasoning: str


class _Source:
    def __init__(self, code: str):
        self.code = code
        self.lines = code.split("\n")

    def span(self, node: ast.AST) -> tuple[int, int, int] | None:
        """(line, start, end) str indices of a node lying on one line, else None."""
        if getattr(node, "end_lineno", None) != getattr(node, "lineno", -1):
            return None
        line = self.lines[node.lineno - 1]
        return node.lineno, _char_col(line, node.col_offset), _char_col(line, node.end_col_offset)

    def text(self, node: ast.AST) -> str | None:
        s = self.span(node)
        if s is None:
            return None
        return self.lines[s[0] - 1][s[1] : s[2]]

    def replace(self, lineno: int, start: int, end: int, new: str) -> tuple[str, str, str]:
        line = self.lines[lineno - 1]
        new_line = line[:start] + new + line[end:]
        lines = list(self.lines)
        lines[lineno - 1] = new_line
        return "\n".join(lines), line, new_line

    def gap(self, left: ast.AST, right: ast.AST) -> tuple[int, int, int] | None:
        """The text between two nodes on the same line (where the operator lives)."""
        a, b = self.span(left), self.span(right)
        if a is None or b is None or a[0] != b[0] or a[2] > b[1]:
            return None
        return a[0], a[2], b[1]


_GAP = re.compile(r"^([\s()]*)(.*?)([\s()]*)$", re.S)

_BINOPS: dict[type, tuple[str, type, str]] = {
    ast.Add: ("+", ast.Sub, "-"),
    ast.Sub: ("-", ast.Add, "+"),
    ast.Mult: ("*", ast.FloorDiv, "//"),
    ast.Div: ("/", ast.Mult, "*"),
    ast.FloorDiv: ("//", ast.Mult, "*"),
    ast.Mod: ("%", ast.FloorDiv, "//"),
    ast.BitAnd: ("&", ast.BitOr, "|"),
    ast.BitOr: ("|", ast.BitAnd, "&"),
    ast.LShift: ("<<", ast.RShift, ">>"),
    ast.RShift: (">>", ast.LShift, "<<"),
    ast.Pow: ("**", ast.Mult, "*"),
}
_CMPOPS: dict[type, tuple[str, str, str]] = {
    # op: (text, replacement text, what the rewritten test does differently)
    ast.Lt: ("<", "<=", "also lets the boundary value through"),
    ast.LtE: ("<=", "<", "now excludes the boundary value"),
    ast.Gt: (">", ">=", "also lets the boundary value through"),
    ast.GtE: (">=", ">", "now excludes the boundary value"),
    ast.Eq: ("==", "!=", "inverts the equality test"),
    ast.NotEq: ("!=", "==", "inverts the equality test"),
    ast.Is: ("is", "is not", "inverts the identity check"),
    ast.IsNot: ("is not", "is", "inverts the identity check"),
    ast.In: ("in", "not in", "inverts the membership test"),
    ast.NotIn: ("not in", "in", "inverts the membership test"),
}


def _replace_in_gap(
    src: _Source, gap: tuple[int, int, int], expected: str, new: str
) -> tuple[str, str, str] | None:
    lineno, start, end = gap
    text = src.lines[lineno - 1][start:end]
    m = _GAP.match(text)
    if not m or " ".join(m.group(2).split()) != expected:
        return None
    return src.replace(lineno, start, end, m.group(1) + new + m.group(3))


def _locals_by_line(fn: ast.FunctionDef | ast.AsyncFunctionDef, nodes: list[ast.AST]) -> dict[str, int]:
    """Local names of the function and the line where each first gets a value (params: the def line)."""
    first: dict[str, int] = {}
    a = fn.args
    for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
        first.setdefault(arg.arg, fn.lineno)
    for node in nodes:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            first.setdefault(node.id, node.lineno)
    first.pop("self", None)
    first.pop("cls", None)
    first.pop("_", None)
    return first


# calls whose first two arguments can be swapped without changing behaviour (or nearly so)
_SYMMETRIC_CALLS = {
    "max", "min", "print", "hypot", "gcd", "lcm", "isclose", "add", "mul", "eq", "ne", "union", "intersection",
    "assertEqual", "assertNotEqual", "assertAlmostEqual", "assertNotAlmostEqual", "assertIs", "assertIsNot",
    "assertCountEqual", "assertSetEqual", "assertListEqual", "assertDictEqual", "assertTupleEqual",
    "assert_equal", "assert_array_equal", "assert_allclose", "allclose", "array_equal",
}  # fmt: skip


def _enclosing_range(node: ast.AST, parents: dict[int, ast.AST]) -> bool:
    p = parents.get(id(node))
    return isinstance(p, ast.Call) and isinstance(p.func, ast.Name) and p.func.id == "range"


def _candidates(func_code: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, list]:
    nodes = _own_nodes(fn)
    body_start = fn.body[0].lineno
    doc = _docstring_node(fn)
    nodes = [n for n in nodes if getattr(n, "lineno", 0) >= body_start]
    if doc is not None:
        nodes = [n for n in nodes if not (doc.lineno <= n.lineno <= (doc.end_lineno or doc.lineno))]
    cands: dict[str, list] = {k: [] for k in MUTATIONS}
    locals_ = _locals_by_line(fn, nodes)
    for node in nodes:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in locals_:
            cands["variable_misuse"].append(node)
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            strs = [
                x
                for x in (node.left, node.right)
                if isinstance(x, ast.Constant) and isinstance(x.value, str | bytes)
            ]
            if not strs and not isinstance(node.left, ast.JoinedStr):
                cands["binary_operator"].append(node)
        elif isinstance(node, ast.AugAssign) and type(node.op) in _BINOPS:
            cands["binary_operator"].append(node)
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            cands["comparison"].append(node)
        elif isinstance(node, ast.BoolOp):
            cands["boolean_operator"].append(node)
        elif isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= 10:
            cands["off_by_one"].append(node)
        elif (
            isinstance(node, ast.Call)
            and len(node.args) >= 2
            and not any(isinstance(x, ast.Starred) for x in node.args[:2])
            and (_dotted(node.func) or "").rsplit(".", 1)[-1] not in _SYMMETRIC_CALLS
        ):
            cands["swapped_arguments"].append(node)
        elif isinstance(node, ast.If | ast.While) and (
            isinstance(node.test, ast.Name | ast.Attribute | ast.Call | ast.Subscript | ast.BoolOp)
            or (isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not))
        ):  # comparisons are left to the comparison mutation (`not (a is None)` is not a real bug)
            cands["negation"].append(node)
        elif isinstance(node, ast.Return) and node.value is not None:
            cands["wrong_return"].append(node)
    cands["_locals"] = [locals_]  # type: ignore[list-item]
    return cands


def _q(text: str) -> str:
    return f"`{_short(text, 60)}`"


def _mutate_one(
    kind: str, node: ast.AST, src: _Source, fn, locals_: dict[str, int], parents, rng: random.Random
):
    """Apply one mutation at one site; returns (code, old_line, new_line, hint, reasoning) or None."""
    if kind == "variable_misuse":
        span = src.span(node)
        right = node.id
        others = [
            n for n, ln in locals_.items() if n != right and ln <= node.lineno and not n.startswith("__")
        ]
        if not span or not others:
            return None
        wrong = rng.choice(sorted(others))
        code, old, new = src.replace(span[0], span[1], span[2], wrong)
        where = "a parameter" if locals_[right] == fn.lineno else f"set on line {locals_[right]}"
        reasoning = (
            f"Line {span[0]} reads `{wrong}`, but this expression works on `{right}` ({where}); "
            f"`{wrong}` holds a different value here."
        )
        return code, old, new, f"`{wrong}` is used where `{right}` is expected", reasoning
    if kind == "binary_operator":
        if isinstance(node, ast.AugAssign):
            sym, _, new_sym = _BINOPS[type(node.op)]
            gap = src.gap(node.target, node.value)
            if gap is None:
                return None
            r = _replace_in_gap(src, gap, sym + "=", new_sym + "=")
            if r is None:
                return None
            target = _unparse(node.target)
            reasoning = (
                f"Line {gap[0]} updates `{target}` with `{new_sym}=`; the accumulation around it "
                f"needs `{sym}=`, so the value drifts the wrong way."
            )
            return (*r, f"`{new_sym}=` should be `{sym}=`", reasoning)
        sym, _, new_sym = _BINOPS[type(node.op)]
        gap = src.gap(node.left, node.right)
        if gap is None:
            return None
        r = _replace_in_gap(src, gap, sym, new_sym)
        if r is None:
            return None
        old_expr = src.text(node) or _unparse(node)
        reasoning = (
            f"Line {gap[0]} computes {_q(_unparse(node.left, 24) + ' ' + new_sym + ' ' + _unparse(node.right, 24))}; "
            f"the code that uses the result expects {_q(old_expr)}, the `{sym}` of the two operands."
        )
        return (*r, f"`{new_sym}` should be `{sym}`", reasoning)
    if kind == "comparison":
        sym, new_sym, effect = _CMPOPS[type(node.ops[0])]
        gap = src.gap(node.left, node.comparators[0])
        if gap is None:
            return None
        r = _replace_in_gap(src, gap, sym, new_sym)
        if r is None:
            return None
        new_expr = f"{_unparse(node.left, 24)} {new_sym} {_unparse(node.comparators[0], 24)}"
        reasoning = (
            f"Line {gap[0]} tests {_q(new_expr)}, which {effect}; the surrounding code expects `{sym}` here."
        )
        return (*r, f"`{new_sym}` should be `{sym}`", reasoning)
    if kind == "boolean_operator":
        sym = "and" if isinstance(node.op, ast.And) else "or"
        new_sym = "or" if sym == "and" else "and"
        gap = src.gap(node.values[0], node.values[1])
        if gap is None:
            return None
        r = _replace_in_gap(src, gap, sym, new_sym)
        if r is None:
            return None
        need = "both conditions to hold" if sym == "and" else "either condition to be enough"
        reasoning = (
            f"Line {gap[0]} joins {_q(_unparse(node.values[0], 24))} and {_q(_unparse(node.values[1], 24))} "
            f"with `{new_sym}`, but the branch needs {need}."
        )
        return (*r, f"`{new_sym}` should be `{sym}`", reasoning)
    if kind == "off_by_one":
        span = src.span(node)
        if span is None or src.text(node) != str(node.value):
            return None
        delta = 1 if node.value == 0 else rng.choice((-1, 1))
        new_val = node.value + delta
        code, old, new = src.replace(span[0], span[1], span[2], str(new_val))
        if _enclosing_range(node, parents):
            what = (
                "the range covers one element too many" if delta > 0 else "the range stops one element early"
            )
        else:
            what = "one more than the code needs" if delta > 0 else "one less than the code needs"
        reasoning = f"Line {span[0]} uses `{new_val}` where the logic calls for `{node.value}`: {what}."
        return code, old, new, f"off by one: `{new_val}` should be `{node.value}`", reasoning
    if kind == "swapped_arguments":
        a, b = node.args[0], node.args[1]
        ta, tb = src.text(a), src.text(b)
        sa, sb = src.span(a), src.span(b)
        if not (ta and tb and sa and sb) or ta == tb or sa[0] != sb[0]:
            return None
        line = src.lines[sa[0] - 1]
        between = line[sa[2] : sb[1]]
        code, old, new = src.replace(sa[0], sa[1], sb[2], tb + between + ta)
        fname = _dotted(node.func) or _short(src.text(node.func) or "the call", 30)
        reasoning = (
            f"Line {sa[0]} passes `{_short(tb, 24)}` first and `{_short(ta, 24)}` second to `{fname}`; "
            f"the call needs them in the other order."
        )
        return code, old, new, f"arguments of `{fname}` are swapped", reasoning
    if kind == "negation":
        test = node.test
        span = src.span(test)
        if span is None:
            return None
        text = src.text(test)
        keyword = "if" if isinstance(node, ast.If) else "while"
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            inner = src.text(test.operand)
            if inner is None:
                return None
            new_text = inner
            code, old, new = src.replace(span[0], span[1], span[2], new_text)
            reasoning = (
                f"Line {span[0]} enters the `{keyword}` when {_q(new_text)} holds; the branch is meant "
                f"for the opposite case, `not {_short(inner, 40)}`."
            )
            return code, old, new, f"missing `not` in the `{keyword}` condition", reasoning
        wrap = isinstance(test, ast.BoolOp | ast.IfExp | ast.Lambda | ast.Compare)
        new_text = f"not ({text})" if wrap else f"not {text}"
        code, old, new = src.replace(span[0], span[1], span[2], new_text)
        reasoning = (
            f"Line {span[0]} negates the `{keyword}` condition to {_q(new_text)}; the body that follows "
            f"handles the case where {_q(text)} holds."
        )
        return code, old, new, f"the `{keyword}` condition should not be negated", reasoning
    if kind == "wrong_return":
        span = src.span(node.value)
        if span is None:
            return None
        text = src.text(node.value) or ""
        others = [
            n for n, ln in locals_.items() if ln <= node.lineno and n != text and not n.startswith("__")
        ]
        if isinstance(node.value, ast.Constant) and node.value.value is None:
            if not others:
                return None
            new_val = rng.choice(sorted(others))
        elif isinstance(node.value, ast.Name) and others and rng.random() < 0.5:
            new_val = rng.choice(sorted(others))
        else:
            new_val = "None"
        code, old, new = src.replace(span[0], span[1], span[2], new_val)
        reasoning = (
            f"Line {span[0]} returns `{new_val}`, but the caller expects {_q(text)}, "
            f"the value the function just computed."
        )
        return code, old, new, f"returns `{new_val}` instead of {_q(text)}", reasoning
    raise ValueError(f"unknown mutation {kind!r}")


def mutate(code: str, rng: random.Random, kinds: Iterable[str] | None = None) -> Mutation | None:
    """Inject one single-line bug into a function (exact source-segment rewrite); None if none fits.

    The result always parses, differs from ``code`` on exactly one line, and has a different AST.
    """
    try:
        mod = _parse(code)
    except SyntaxError:
        return None
    fn = mod.body[0]
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    src = _Source(code)
    cands = _candidates(code, fn)
    locals_ = cands.pop("_locals")[0]
    parents: dict[int, ast.AST] = {}
    for node in ast.walk(fn):
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    order = [k for k in (kinds or MUTATIONS) if cands.get(k)]
    rng.shuffle(order)
    # almost every function has a return; half the time try the other kinds first
    if "wrong_return" in order and len(order) > 1 and rng.random() < 0.5:
        order.remove("wrong_return")
        order.append("wrong_return")
    original_dump = ast.dump(mod)
    for kind in order:
        sites = list(cands[kind])
        rng.shuffle(sites)
        for node in sites[:6]:
            try:
                r = _mutate_one(kind, node, src, fn, locals_, parents, rng)
            except (ValueError, IndexError, AttributeError):
                r = None
            if r is None:
                continue
            new_code, old_line, new_line, hint, reasoning = r
            if new_line == old_line:
                continue
            try:
                new_dump = ast.dump(_parse(new_code))
            except (SyntaxError, ValueError):
                continue
            if new_dump == original_dump:
                continue
            line = next(
                i for i, (x, y) in enumerate(zip(code.split("\n"), new_code.split("\n")), 1) if x != y
            )
            return Mutation(kind, line, new_code, old_line, new_line, hint, reasoning)
    return None


def clean_reasoning(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    facts = function_facts(fn)
    parts = [f"Takes {_and_list(facts.params)}." if facts.params else "Takes no arguments."]
    if facts.returns:
        parts.append(f"Returns `{facts.returns[0]}`.")
    parts.append("Each name, operator, bound and return matches how the values are used.")
    return " ".join(parts)


# --------------------------------------------------------------------------- eval overlap


def _body_key(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    body = fn.body[1:] if _docstring_node(fn) is not None else fn.body
    dump = ast.dump(ast.Module(body=body, type_ignores=[]), annotate_fields=False)
    return hashlib.sha1(dump.encode()).hexdigest()


class EvalOverlap:
    """Is a function also in the evaluation sets (MBPP, QuixBugs)?

    Two checks: the corpus owner's :class:`model.data.eval_overlap.EvalIndex` (shared line windows
    and token shingles), and an exact match of the AST-normalised function body (catches renamed or
    reformatted copies of short functions that the line windows miss).
    """

    def __init__(self, eval_dir: str | Path | None = None):
        from model.data.eval_overlap import EvalIndex, default_eval_dir

        self.eval_dir = Path(eval_dir) if eval_dir is not None else default_eval_dir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missing eval dir is reported by build_tasks
            self.index = EvalIndex.load(self.eval_dir)
        self.keys: set[str] = set()
        for _name, text in self.index.sources:
            for f in extract_functions(text):
                self.keys.add(_body_key(f.node))

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, func: Function) -> bool:
        return _body_key(func.node) in self.keys or self.index.match(func.code) is not None


# --------------------------------------------------------------------------- examples


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest(), "little")


def examples_for_function(func: Function, rng: random.Random) -> list[dict]:
    """The task examples (raw dicts) made from one function."""
    out: list[dict] = []
    base = {"package": func.package, "path": func.path, "function": func.name}
    if func.docstring and len(func.docstring.split()) >= 3:
        stripped = strip_docstring(func)
        if stripped is not None:
            node = _parse(stripped).body[0]
            reasoning = facts_reasoning(function_facts(node))
            if rng.random() < EXPLAIN_SHARE:
                answer = docstring_summary(func.docstring)
                out.append(
                    {"task": "explain", "code": stripped, "reasoning": reasoning, "answer": answer, **base}
                )
            else:
                answer = docstring_target(func.docstring)
                out.append({"task": "comment", "code": stripped, "reasoning": reasoning, "answer": answer,
                            "docstring": func.docstring, **base})  # fmt: skip
    # debug: on the function as written (docstring kept, as users see it)
    if len(func.node.body) >= 2 or _docstring_node(func.node) is None:
        mut = None if rng.random() < CLEAN_SHARE else mutate(func.code, rng)
        if mut is None:
            out.append({"task": "debug", "code": number_lines(func.code), "reasoning": clean_reasoning(func.node),
                        "answer": NO_ISSUE, "bug": None, "original": func.code, **base})  # fmt: skip
        else:
            answer = format_finding(Finding(mut.line, mut.hint, mut.old_line.strip()))
            out.append({"task": "debug", "code": number_lines(mut.code), "reasoning": mut.reasoning,
                        "answer": answer, "bug": mut.kind, "line": mut.line, "fix": mut.old_line.strip(),
                        "original": func.code, **base})  # fmt: skip
    return out


def examples_for_source(
    text: str, path: str = "", package: str = "", overlap: EvalOverlap | None = None
) -> list[dict]:
    out = []
    for func in extract_functions(text, path, package):
        if overlap is not None and overlap.contains(func):
            continue
        rng = random.Random(_seed(path, func.name, str(func.node.lineno), func.code[:64]))
        out.extend(examples_for_function(func, rng))
    return out


# --------------------------------------------------------------------------- corpus -> files


def iter_corpus(corpus: Path, split: str, bad: list | None = None) -> Iterator[dict]:
    """Records of a split's shards; malformed lines are skipped and noted in ``bad``."""
    for shard in sorted((corpus / split).glob("shard-*.jsonl")):
        with shard.open(encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = None
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    yield rec
                elif bad is not None:
                    bad.append(f"{shard.name}:{n}")


_W: dict = {}


def _worker_init(tok_path: str | None, eval_dir: str | None) -> None:
    if tok_path is not None:
        from model.tokenizer import Tokenizer

        _W["tok"] = Tokenizer.load(tok_path)
    _W["overlap"] = EvalOverlap(eval_dir)


def _encode(tok, ex: dict) -> tuple[list[int], int]:
    from model.formats import task_example

    return task_example(tok, ex["task"], ex["code"], ex["reasoning"], ex["answer"])


def _work(records: list[dict]) -> tuple[int, list[tuple[dict, list[int], int]]]:
    out = []
    for rec in records:
        path = str(rec.get("path", ""))
        if "shared/eval" in path.replace("\\", "/"):
            continue
        for ex in examples_for_source(rec.get("text", ""), path, str(rec.get("package", "")), _W["overlap"]):
            ids, tgt = _encode(_W["tok"], ex)
            out.append((ex, ids, tgt))
    return len(records), out


def _chunks(it: Iterator[dict], n: int) -> Iterator[list[dict]]:
    buf: list[dict] = []
    for rec in it:
        buf.append(rec)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


class _SplitWriter:
    def __init__(self, out: Path, split: str, dtype):
        import numpy as np

        self.np = np
        self.dtype = dtype
        self.jsonl = (out / f"{split}.jsonl.tmp").open("w", encoding="utf-8")
        self.bin = (out / f"{split}.bin.tmp").open("wb")
        self.offsets = [0]
        self.targets: list[int] = []
        self.bytes = 0
        self.by_task: dict[str, int] = {}
        self.bugs: dict[str, int] = {}

    def add(self, ex: dict, ids: list[int], tgt: int) -> None:
        self.jsonl.write(json.dumps(ex, ensure_ascii=False) + "\n")
        self.bin.write(self.np.asarray(ids, dtype=self.dtype).tobytes())
        self.targets.append(self.offsets[-1] + tgt)
        self.offsets.append(self.offsets[-1] + len(ids))
        self.bytes += len((ex["code"] + ex["reasoning"] + ex["answer"]).encode())
        self.by_task[ex["task"]] = self.by_task.get(ex["task"], 0) + 1
        if ex["task"] == "debug":
            key = ex.get("bug") or "none"
            self.bugs[key] = self.bugs.get(key, 0) + 1

    @property
    def docs(self) -> int:
        return len(self.offsets) - 1

    def close(self, out: Path, split: str) -> dict:
        self.jsonl.close()
        self.bin.close()
        np = self.np
        with (out / f"{split}.idx.tmp").open("wb") as fh:
            np.save(fh, np.asarray(self.offsets, dtype=np.int64))
        with (out / f"{split}.tgt.tmp").open("wb") as fh:
            np.save(fh, np.asarray(self.targets, dtype=np.int64))
        for ext in ("jsonl", "bin", "idx", "tgt"):
            os.replace(out / f"{split}.{ext}.tmp", out / f"{split}.{ext}")
        return {"tokens": self.offsets[-1], "docs": self.docs, "bytes": self.bytes,
                "tasks": self.by_task, "debug_bugs": self.bugs}  # fmt: skip


def _tokenizer_sha256(tokenizer, tokenizer_path) -> str | None:
    path = getattr(tokenizer, "path", None) or tokenizer_path
    if path is None:
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.model"
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError:
        return None


class _Progress:
    """Files and examples per split (:class:`model.progress.Progress`; the total is unknown)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, Progress] = {}

    def __call__(self, split: str, files: int, examples: int, done: bool = False) -> None:
        bar = self.bars.get(split)
        if bar is None:
            bar = self.bars[split] = Progress(f"  {split} (files)", None, enabled=self.enabled)
        bar.update(files, f"{examples} examples")
        if done:
            bar.close()


def build_tasks(
    corpus: str | Path,
    out: str | Path,
    tokenizer=None,
    tokenizer_path: str | Path | None = None,
    max_functions: int = 200_000,
    workers: int = 1,
    eval_dir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Write task data for every split of ``corpus`` into ``out``; returns the meta dict.

    ``max_functions`` caps the train examples; valid and test get at most a tenth of it each.
    Give either a loaded ``tokenizer`` (used in-process) or ``tokenizer_path`` (loaded per worker).
    """
    import numpy as np

    corpus, out = Path(corpus), Path(out)
    if tokenizer is None:
        if tokenizer_path is None:
            raise ValueError("give a tokenizer or a tokenizer path")
        from model.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer_path)
    out.mkdir(parents=True, exist_ok=True)
    vocab = int(tokenizer.vocab_size)
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    meta: dict = {
        "kind": "tasks",
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "tokenizer": str(Path(tokenizer_path).resolve()) if tokenizer_path is not None else "",
        "eos_id": int(tokenizer.eos_id),
        "pad_id": int(getattr(tokenizer, "pad_id", 0)),
        "corpus": str(corpus.resolve()),
        # the same vocab size does not mean the same tokenizer: readers can compare this hash
        "tokenizer_sha256": _tokenizer_sha256(tokenizer, tokenizer_path),
        "splits": {},
        "target_offsets": "{split}.tgt",
        "clean_share": CLEAN_SHARE,
        "explain_share": EXPLAIN_SHARE,
    }
    probe = EvalOverlap(eval_dir)
    meta["eval_dir"] = str(probe.eval_dir)
    meta["eval_functions"] = len(probe)  # 0: the overlap filter was off
    if not len(probe) and progress:
        print(f"warning: no evaluation data in {probe.eval_dir}: eval-overlap filtering is OFF "
              "(pass --eval-dir or set MOECODER_EVAL_DIR)", file=sys.stderr)  # fmt: skip
    show = _Progress(progress)
    pool = None
    if workers > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
        pool = ctx.Pool(workers, initializer=_worker_init,
                        initargs=(str(tokenizer_path) if tokenizer_path else None, str(eval_dir) if eval_dir else None))  # fmt: skip
    else:
        _W["tok"] = tokenizer
        _W["overlap"] = probe
    if pool is not None and tokenizer_path is None:
        pool.close()
        raise ValueError("workers > 1 needs tokenizer_path")
    bad: list[str] = []
    try:
        for split in ("test", "valid", "train"):
            if not (corpus / split).is_dir():
                continue
            cap = max_functions if split == "train" else max(1, max_functions // 10)
            writer = _SplitWriter(out, split, dtype)
            files = 0
            chunks = _chunks(iter_corpus(corpus, split, bad), 16)
            results = pool.imap(_work, chunks) if pool is not None else map(_work, chunks)
            for n_files, batch in results:
                files += n_files
                for ex, ids, tgt in batch:
                    if writer.docs >= cap:
                        break
                    writer.add(ex, ids, tgt)
                show(split, files, writer.docs)
                if writer.docs >= cap:
                    break
            meta["splits"][split] = writer.close(out, split)
            show(split, files, writer.docs, done=True)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    meta["malformed_records"] = len(bad)
    if bad and progress:
        print(f"warning: skipped {len(bad)} malformed corpus records (first: {bad[0]})", file=sys.stderr)
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def corpus_eval_dir(corpus: Path) -> str | None:
    """The evaluation set the corpus itself was filtered against (its report.json), if it exists here."""
    try:
        d = json.loads((corpus / "report.json").read_text()).get("config", {}).get("eval_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return d if d and Path(d).is_dir() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moecoder data tasks", description=__doc__.split("\n")[0])
    p.add_argument("corpus", metavar="CORPUS_DIR", help="a corpus written by `moecoder data corpus`")
    p.add_argument("--tokenizer", required=True, help="tokenizer .model file or directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-functions", type=int, default=200_000,
                   help="cap on train examples (valid/test: a tenth each); default 200000")  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 1)), help="processes (default: all cores)"
    )
    p.add_argument("--eval-dir", default=None,
                   help="evaluation data to exclude (default: $MOECODER_EVAL_DIR, else the corpus's own "
                        "eval dir from its report.json, else ../shared/eval)")  # fmt: skip
    args = p.parse_args(argv)
    corpus, out = Path(args.corpus), Path(args.out)
    if not corpus.is_dir() or not any((corpus / s).is_dir() for s in SPLITS):
        print(
            f"moecoder data tasks: error: {corpus} is not a corpus directory (no train/valid/test)",
            file=sys.stderr,
        )
        return 2
    if not Path(args.tokenizer).exists():
        print(f"moecoder data tasks: error: tokenizer {args.tokenizer} not found", file=sys.stderr)
        return 2
    if args.max_functions < 1 or args.workers < 1:
        print("moecoder data tasks: error: --max-functions and --workers must be positive", file=sys.stderr)
        return 2
    if out.exists() and not out.is_dir():
        print(f"moecoder data tasks: error: {out} exists and is not a directory", file=sys.stderr)
        return 2
    if out.is_dir() and (out / "meta.json").exists():
        try:
            kind = json.loads((out / "meta.json").read_text()).get("kind")
        except (OSError, ValueError):
            kind = None
        if kind != "tasks":
            print(
                f"moecoder data tasks: error: {out} holds other data; refusing to overwrite", file=sys.stderr
            )
            return 2
    try:
        from model.tokenizer import Tokenizer

        tok = Tokenizer.load(args.tokenizer)
    except Exception as e:  # tokenizer errors are user errors here
        print(f"moecoder data tasks: error: cannot load tokenizer: {e}".splitlines()[0], file=sys.stderr)
        return 2
    eval_dir = args.eval_dir
    if eval_dir is None and not os.environ.get("MOECODER_EVAL_DIR"):
        eval_dir = corpus_eval_dir(corpus)
    t0 = time.monotonic()
    meta = build_tasks(corpus, out, tokenizer=tok, tokenizer_path=args.tokenizer, max_functions=args.max_functions,
                       workers=args.workers, eval_dir=eval_dir, progress=True)  # fmt: skip
    for split, s in meta["splits"].items():
        print(
            f"{split}: {s['docs']} examples, {s['tokens']} tokens; tasks {s['tasks']}; debug {s['debug_bugs']}"
        )
    print(f"wrote {out} in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
