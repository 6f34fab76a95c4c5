"""Candidate fixes for a suspicious line: cheap mutations plus the model's own proposals.

Mutations (one edit each, the kinds of slips real one-line bugs are made of): a comparison
swapped (``<`` / ``<=`` / ``>`` / ``>=`` / ``==`` / ``!=``, ``in`` / ``not in``, ``is`` /
``is not``), an arithmetic, bitwise or augmented-assignment operator swapped, ``and`` / ``or``,
``True`` / ``False``, a ``not`` dropped or added, an integer off by one, ``+ 1`` / ``- 1`` added
after an operand or dropped, two arguments of a call or the operands of a non-commutative
operator swapped, a variable replaced by another name in scope, the statement dropped. The
model proposes lines too: its debug answer's fix and completions of the line (FIM) given the
code around it. Every candidate must parse; duplicates go. :mod:`assistant.evidence` runs the
evidence on each; the verified ones are ranked by the model's likelihood of the function.
"""

from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

COMPARE = ["<", "<=", ">", ">=", "==", "!="]
ARITH = ["+", "-", "*", "/", "//", "%", "**"]
BITS = ["&", "|", "^", "<<", ">>"]
AUG = {op + "=": [o + "=" for o in group if o != op] for group in (ARITH, BITS) for op in group}
SWAP = {**{op: [o for o in COMPARE if o != op] for op in COMPARE},
        **{op: [o for o in ARITH if o != op] for op in ARITH},
        **{op: [o for o in BITS if o != op] + (["+", "-"] if op == "^" else []) for op in BITS},
        **AUG, "and": ["or"], "or": ["and"], "True": ["False"], "False": ["True"],
        "in": ["not in"], "is": ["is not"], "max": ["min"], "min": ["max"], "any": ["all"], "all": ["any"]}
NON_COMMUTATIVE = (ast.Sub, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.LShift, ast.RShift)
MAX_PER_LINE = 120


@dataclass
class Candidate:
    line: int  # 1-based line replaced
    text: str  # the whole new line (indentation kept); "" drops nothing: see ``drop``
    how: str  # a short description: "`<` -> `<=`"
    origin: str  # "mutation" | "model"
    prior: int  # order among mutations (smaller = simpler / more common)

    def apply(self, source: str) -> str:
        lines = source.split("\n")
        lines[self.line - 1] = self.text
        return "\n".join(lines)


def _tokens(code: str) -> list[tokenize.TokenInfo] | None:
    """The line's tokens; a line that opens a bracket it does not close (the first line of a
    statement written over several lines) gives the tokens read before the end."""
    out: list[tokenize.TokenInfo] = []
    try:
        for t in tokenize.generate_tokens(io.StringIO(code).readline):
            if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.INDENT,
                              tokenize.DEDENT, tokenize.COMMENT):
                out.append(t)
    except tokenize.TokenError:
        return out or None  # EOF inside brackets: what was read is the line's tokens
    except (IndentationError, SyntaxError):
        return None
    return out


def _replace(code: str, start: int, end: int, new: str) -> str:
    return code[:start] + new + code[end:]


def _names_in_scope(fn: ast.AST) -> list[str]:
    names: list[str] = []
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = fn.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None:
                names.append(arg.arg)
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
        elif isinstance(node, ast.arg):
            names.append(node.arg)
    return list(dict.fromkeys(n for n in names if not keyword.iskeyword(n)))


def _offsets(lines: list[str]) -> list[int]:
    out, pos = [], 0
    for ln in lines:
        out.append(pos)
        pos += len(ln) + 1
    return out


def mutations(source: str, line: int, fn: ast.AST | None = None, fragment: bool = False,
              ) -> Iterator[tuple[str, str, int]]:
    """(new line, description, prior) for the 1-based ``line`` of ``source``. ``fragment``: the
    line is a later line of a statement written over several lines (no statement-level changes)."""
    lines = source.split("\n")
    old = lines[line - 1]
    indent = old[: len(old) - len(old.lstrip())]
    code = old.strip()
    toks = _tokens(code + "\n") or []
    # where the code starts inside the stripped line: token columns are relative to ``code``
    def at(t: tokenize.TokenInfo) -> tuple[int, int]:
        return t.start[1], t.end[1]

    # 1. operator / keyword swaps
    for i, t in enumerate(toks):
        s = t.string
        if t.type == tokenize.NAME and s == "not" and i + 1 < len(toks) and toks[i + 1].string == "in":
            a, _ = at(t)
            _, b = at(toks[i + 1])
            yield indent + _replace(code, a, b, "in"), "`not in` -> `in`", 0
            continue
        if t.type == tokenize.NAME and s == "is" and i + 1 < len(toks) and toks[i + 1].string == "not":
            a, _ = at(t)
            _, b = at(toks[i + 1])
            yield indent + _replace(code, a, b, "is"), "`is not` -> `is`", 0
            continue
        if s in SWAP and (t.type == tokenize.OP or s in ("and", "or", "True", "False", "in", "is", "max", "min", "any", "all")):
            if s == "in" and (i > 0 and toks[i - 1].string in ("not", "for") or any(x.string == "for" for x in toks[:i])
                              and not any(x.string in ("if", "while") for x in toks[:i])):
                continue
            if s == "*" and (i == 0 or toks[i - 1].string in ("(", ",", "[", "=")):
                continue  # star-args, not a product
            if s in ("-", "+") and (i == 0 or toks[i - 1].type == tokenize.OP and toks[i - 1].string not in (")", "]")):
                continue  # a sign, not a difference
            a, b = at(t)
            for new in SWAP[s]:
                yield indent + _replace(code, a, b, new), f"`{s}` -> `{new}`", 0 if s in COMPARE or s in AUG else 1
        if t.type == tokenize.NAME and s == "not":
            a, _ = at(t)
            b = toks[i + 1].start[1] if i + 1 < len(toks) else len(code)
            yield indent + _replace(code, a, b, ""), "drop `not`", 1
    # ``not`` added to a condition
    if not fragment and toks and toks[0].string in ("if", "elif", "while") and code.endswith(":"):
        cond = code[len(toks[0].string):-1].strip()
        if not cond.startswith("not "):
            yield f"{indent}{toks[0].string} not ({cond}):", "negate the condition", 2
    # 2. numbers off by one
    for t in toks:
        if t.type == tokenize.NUMBER and re.fullmatch(r"\d+", t.string):
            v = int(t.string)
            a, b = at(t)
            for new in (v + 1, v - 1):
                if new >= 0:
                    yield indent + _replace(code, a, b, str(new)), f"`{v}` -> `{new}`", 1
    # drop an existing "+ 1" / "- 1"
    for m in re.finditer(r"\s*([+-])\s*1\b(?!\.)", code):
        yield indent + code[: m.start()] + code[m.end():], f"drop `{m.group(1)} 1`", 1
    # add "+ 1" / "- 1" after an operand that ends before ) ] , : or the end
    for i, t in enumerate(toks):
        if t.type in (tokenize.NAME, tokenize.NUMBER) or t.string in (")", "]"):
            if t.type == tokenize.NAME and (keyword.iskeyword(t.string) or (i + 1 < len(toks) and toks[i + 1].string in ("(", ".", "[", "="))):
                continue
            nxt = toks[i + 1].string if i + 1 < len(toks) else ""
            if nxt in (")", "]", ",", ":", "") or nxt in COMPARE or nxt in ARITH:
                _, b = at(t)
                for op in ("+", "-"):
                    yield indent + code[:b] + f" {op} 1" + code[b:], f"`{t.string}` -> `{t.string} {op} 1`", 2
    # 3. swapped arguments / operands (from the AST of the statement)
    try:
        stmt_tree = ast.parse(code if not code.endswith(":") else code + "\n" + indent + "    pass")
    except SyntaxError:
        stmt_tree = None
    if stmt_tree is not None:
        for node in ast.walk(stmt_tree):
            if isinstance(node, ast.Call) and len(node.args) >= 2:
                segs = [ast.get_source_segment(code, a_) for a_ in node.args]
                if any(s is None for s in segs):
                    continue
                for i in range(len(node.args)):
                    for j in range(i + 1, len(node.args)):
                        ai, aj = node.args[i], node.args[j]
                        if ai.end_lineno != 1 or aj.end_lineno != 1:
                            continue
                        new = (code[:ai.col_offset] + segs[j] + code[ai.end_col_offset:aj.col_offset] + segs[i]
                               + code[aj.end_col_offset:])
                        yield indent + new, f"swap arguments `{segs[i]}` and `{segs[j]}`", 2
            elif isinstance(node, ast.BinOp) and node.lineno == 1 and node.end_lineno == 1:
                l_, r_ = ast.get_source_segment(code, node.left), ast.get_source_segment(code, node.right)
                if not (l_ and r_ and node.left.end_lineno == 1 and node.right.end_lineno == 1):
                    continue
                if isinstance(node.op, NON_COMMUTATIVE) or (isinstance(node.op, ast.Add) and not (
                        isinstance(node.left, ast.Constant) or isinstance(node.right, ast.Constant))):
                    new = (code[:node.left.col_offset] + r_ + code[node.left.end_col_offset:node.right.col_offset]
                           + l_ + code[node.right.end_col_offset:])
                    yield indent + new, f"swap `{l_}` and `{r_}`", 2 if isinstance(node.op, NON_COMMUTATIVE) else 3
                for keep, drop in ((l_, node.right), (r_, node.left)):
                    if isinstance(drop, ast.Constant) and drop.value in (1, 2):
                        new = code[:node.col_offset] + keep + code[node.end_col_offset:]
                        yield indent + new, f"`{ast.get_source_segment(code, node)}` -> `{keep}`", 1
            elif isinstance(node, ast.Call) and len(node.args) == 1 and not node.keywords \
                    and node.lineno == 1 and node.end_lineno == 1:
                inner = ast.get_source_segment(code, node.args[0])
                if inner and not isinstance(node.args[0], ast.Starred):
                    new = code[:node.col_offset] + inner + code[node.end_col_offset:]
                    yield indent + new, f"`{ast.get_source_segment(code, node)}` -> `{inner}`", 3
            elif isinstance(node, ast.Tuple) and len(node.elts) >= 2 and node.end_lineno == 1:
                # swapped indices / tuple items: ``d[j, k]`` -> ``d[k, j]``
                segs = [ast.get_source_segment(code, e) for e in node.elts]
                if any(s_ is None for s_ in segs) or any(isinstance(e, ast.Starred) for e in node.elts):
                    continue
                for i in range(len(node.elts)):
                    for j in range(i + 1, len(node.elts)):
                        ei, ej = node.elts[i], node.elts[j]
                        if segs[i] == segs[j]:
                            continue
                        new = (code[:ei.col_offset] + segs[j] + code[ei.end_col_offset:ej.col_offset] + segs[i]
                               + code[ej.end_col_offset:])
                        yield indent + new, f"swap `{segs[i]}` and `{segs[j]}`", 2
    # 4. a variable replaced by another name in scope
    scope = _names_in_scope(fn) if fn is not None else []
    if scope:
        for i, t in enumerate(toks):
            if t.type != tokenize.NAME or (keyword.iskeyword(t.string) and t.string not in ("True", "False", "None")):
                continue
            if t.string not in scope and t.string not in ("True", "False", "None"):
                continue
            if i > 0 and toks[i - 1].string == ".":
                continue
            if i + 1 < len(toks) and toks[i + 1].string == "=" and any(x.string in ("(",) for x in toks[:i]):
                continue  # a keyword argument's name
            a, b = at(t)
            for other in scope:
                if other != t.string:
                    yield indent + _replace(code, a, b, other), f"`{t.string}` -> `{other}`", 3
    # attributes: ``.name`` replaced by another attribute the function uses
    attrs = sorted({n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}) if fn is not None else []
    if len(attrs) > 1:
        for i, t in enumerate(toks):
            if t.type == tokenize.NAME and i > 0 and toks[i - 1].string == "." and t.string in attrs:
                a, b = at(t)
                for other in attrs:
                    if other != t.string:
                        yield indent + _replace(code, a, b, other), f"`.{t.string}` -> `.{other}`", 3
    # 5. the statement dropped
    if not fragment and toks and not code.endswith(":") and toks[0].string not in ("return", "yield", "raise", "else", "elif",
                                                                   "except", "finally"):
        yield indent + "pass", "drop the statement", 4


def parses(source: str) -> bool:
    try:
        ast.parse(source)
        return True
    except (SyntaxError, ValueError):
        return False


def _fn_at(source: str, line: int) -> ast.AST | None:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    best = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno <= line <= (node.end_lineno or 0):
            if best is None or node.lineno > best.lineno:
                best = node
    return best


def candidates_for(source: str, line: int, model_lines: Sequence[tuple[str, str]] = (),
                   limit: int = MAX_PER_LINE, fragment: bool = False) -> list[Candidate]:
    """Candidates for the 1-based ``line``: the model's proposals first (``(text, how)``),
    then mutations by prior; only those that parse, no duplicates, none equal to the line.
    ``fragment``: a later line of a statement written over several lines."""
    lines = source.split("\n")
    old = lines[line - 1]
    indent = old[: len(old) - len(old.lstrip())]
    seen = {old.strip()}
    out: list[Candidate] = []
    fn = _fn_at(source, line)

    def norm(text: str) -> str:
        try:
            return ast.dump(ast.parse(text.strip() + ("\n    pass" if text.strip().endswith(":") else "")))
        except SyntaxError:
            return text.strip()

    seen_ast = {norm(old)}
    for text, how in model_lines:
        t = text.strip()
        if not t or t in seen:
            continue
        cand = Candidate(line, indent + t, how, "model", -1)
        if parses(cand.apply(source)) and norm(t) not in seen_ast:
            seen.add(t)
            seen_ast.add(norm(t))
            out.append(cand)
    muts = sorted(mutations(source, line, fn, fragment), key=lambda x: x[2])
    for text, how, prior in muts:
        t = text.strip()
        if t in seen:
            continue
        seen.add(t)
        cand = Candidate(line, text, how, "mutation", prior)
        if not parses(cand.apply(source)):
            continue
        k = norm(t)
        if k in seen_ast:
            continue
        seen_ast.add(k)
        out.append(cand)
        if len(out) >= limit:
            break
    return out


def model_line_proposals(engine: Any, source: str, line: int, path: str | None = None,
                         max_seconds: float = 5.0) -> list[tuple[str, str]]:
    """The model's completion of the 1-based ``line`` given the code around it (the line blanked
    to its indentation, the cursor after the indentation): ``[(text, how)]``."""
    from assistant.tasks import TaskRequest

    lines = source.split("\n")
    old = lines[line - 1]
    indent = old[: len(old) - len(old.lstrip())]
    blanked = "\n".join([*lines[: line - 1], indent, *lines[line:]])
    try:
        res = engine.run(TaskRequest("complete", blanked, path, line=line - 1, column=len(indent),
                                     max_new_tokens=48, max_seconds=max_seconds))
    except Exception:  # noqa: BLE001 - the model's proposal is optional
        return []
    text = (getattr(res, "text", "") or "").split("\n")[0].rstrip()
    return [(text, "the model's completion of the line")] if text.strip() else []


def function_logprob(engine: Any, text: str) -> float:
    """Total log-probability of ``text`` under the model (for ranking verified fixes)."""
    tok = engine.tokenizer
    ids = [tok.eos_id, *tok.encode(text)][: engine.context_length]
    lps = engine.backend.token_logprobs(ids)
    return float(sum(lps[1:]))


def _branches(node: ast.AST) -> list[list[ast.AST]]:
    """The bodies of an ``if`` / ``elif`` / ``else`` chain (or both arms of ``a if c else b``)."""
    if isinstance(node, ast.IfExp):
        return [[node.body], [node.orelse]]
    out: list[list[ast.AST]] = []
    cur: ast.AST | None = node
    while isinstance(cur, ast.If):
        out.append(list(cur.body))
        nxt = cur.orelse
        if len(nxt) == 1 and isinstance(nxt[0], ast.If):
            cur = nxt[0]
        else:
            if nxt:
                out.append(list(nxt))
            cur = None
    return out


def identical_branches(source: str, first: int, last: int) -> set[tuple[int, str]]:
    """``(line of the if, the repeated code)`` for each conditional between lines ``first`` and
    ``last`` whose branches do the same thing (``if c: return f(a) else: return f(a)``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    out: set[tuple[int, str]] = set()
    seen: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.If, ast.IfExp)) or not first <= node.lineno <= last or id(node) in seen:
            continue
        if isinstance(node, ast.If):
            cur = node
            while len(cur.orelse) == 1 and isinstance(cur.orelse[0], ast.If):
                cur = cur.orelse[0]
                seen.add(id(cur))  # an ``elif``: part of this chain
        dumps = [" ".join(ast.dump(s_) for s_ in body) for body in _branches(node)]
        for i in range(len(dumps)):
            for j in range(i + 1, len(dumps)):
                if dumps[i] == dumps[j]:
                    out.add((node.lineno, dumps[i]))
    return out


def makes_branches_identical(source: str, fixed: str, first: int, last: int) -> bool:
    """Whether the change leaves a conditional whose branches now do the same thing: the
    condition stops mattering, so the tests passing says nothing about it (a degenerate fix)."""
    return bool(identical_branches(fixed, first, last) - identical_branches(source, first, last))
