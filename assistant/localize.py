"""Fault localisation: which line of a function is most likely wrong.

Two signals. The evidence (:mod:`assistant.evidence`): Ochiai's spectrum formula over the
failing and passing runs, ``ef / sqrt(F * (ef + ep))`` for a line executed by ``ef`` failing
and ``ep`` passing runs out of ``F`` failing runs (Abreu et al. 2007). The model: how
surprising each line is to it (mean token surprisal, ranked within the function) and the line
its debug answer names. They are combined as ``ochiai + MODEL_WEIGHT x model``. Measured on QuixBugs
(docs/benchmarks.md, "Debugging from evidence"), the shipped model's signal is weak: alone it
puts the bug line first in 5 of 40 programs against 14 for Ochiai, and with the a-priori weight
0.3 it overruled the spectrum (8 of 40). So the model now only orders lines the runs cannot
tell apart (Ochiai ties are common: a loop body runs in every failing run); that choice was
made after seeing QuixBugs, so QuixBugs is no longer an unbiased test of it. With no failing run the ranking is
the model's alone, and the caller says so.

Coverage reports a statement written over several lines on its first line; :func:`physical_lines`
adds its later lines (those holding code), which share the first line's runs and rank just below
it, so that a repair on a later line (``op(token, b, a)`` inside ``stack.append(...)``) can name it.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from assistant.evidence import Evidence

CONTINUATION_EPS = 1e-6  # a statement's later physical lines rank just below its first line
MODEL_WEIGHT = 1e-3  # the model's share next to Ochiai: it only breaks ties (0.3 was measured worse)
MUTATION_WEIGHT = 0.5  # a one-line change that makes failing runs pass (and breaks none) points at its line
ANSWER_SHARE = 0.5  # within the model's signal: the debug answer's line vs the surprisal rank


@dataclass
class Suspect:
    line: int  # 1-based line of the file
    score: float  # the combined score
    ochiai: float
    model: float
    failing: int  # failing runs that executed the line
    passing: int  # passing runs that executed the line


def statement_lines(source: str, first: int, last: int) -> list[int]:
    """1-based first lines of the statements in the function spanning ``first..last`` (the
    ``def`` line and the docstring excluded): the lines coverage reports and a fix replaces."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return list(range(first + 1, last + 1))
    fn = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno == first:
            fn = node
            break
    if fn is None:
        return list(range(first + 1, last + 1))
    body = list(fn.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    lines: set[int] = set()
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try), ast.Pass)):
                continue  # ``try:`` and ``pass`` do nothing that can be wrong
            if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.ClassDef)):
                lines.add(node.lineno)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines.add(node.lineno)
            if isinstance(node, ast.ExceptHandler):
                lines.add(node.lineno)
    return sorted(ln for ln in lines if first < ln <= last)


def _only_brackets(text: str) -> bool:
    return not text.strip().strip("()[]{},:;\\ ")


def physical_lines(source: str, first: int, last: int) -> dict[int, int]:
    """Every physical line of code in the function's statements -> the statement's first line
    (the line coverage reports for it). A statement written over several lines
    (``stack.append(\n    op(token, a, b)\n)``) contributes each of its lines that holds code
    (not only brackets) so that a bug on a later line can be named and repaired there; a
    compound statement contributes its header only (its body's statements are their own)."""
    heads = statement_lines(source, first, last)
    out = {ln: ln for ln in heads}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return out
    text = source.split("\n")
    head_set = set(heads)
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt) or node.lineno not in head_set:
            continue
        end = node.end_lineno or node.lineno
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            end = body[0].lineno - 1  # the header's lines only
        for ln in range(node.lineno + 1, min(end, last) + 1):
            if ln in out or ln in head_set or not 1 <= ln <= len(text):
                continue
            code = text[ln - 1].split("#", 1)[0] if "'" not in text[ln - 1] and '"' not in text[ln - 1] \
                else text[ln - 1]
            if code.strip() and not _only_brackets(code):
                out[ln] = node.lineno
    return dict(sorted(out.items()))


def ochiai(ev: Evidence, lines: Sequence[int], owner: Mapping[int, int] | None = None,
           ) -> dict[int, tuple[float, int, int]]:
    """line -> (Ochiai score, failing runs through it, passing runs through it). ``owner`` maps
    a later physical line of a statement to its first line (coverage records that one)."""
    total_failed = len(ev.failing)
    out = {}
    for ln in lines:
        cov = owner.get(ln, ln) if owner else ln
        ef = sum(1 for r in ev.failing if cov in r.lines)
        ep = sum(1 for r in ev.passing if cov in r.lines)
        s = ef / math.sqrt(total_failed * (ef + ep)) if ef and total_failed else 0.0
        out[ln] = (s, ef, ep)
    return out


def surprisal_ranks(surprisal: Mapping[int, float]) -> dict[int, float]:
    """line -> percentile of its surprisal among the given lines (1.0 = most surprising; ties share)."""
    vals = list(surprisal.values())
    n = len(vals)
    out = {}
    for ln, s in surprisal.items():
        if n <= 1:
            out[ln] = 0.5
            continue
        below = sum(1 for v in vals if v < s)
        equal = sum(1 for v in vals if v == s)
        out[ln] = (below + (equal - 1) / 2) / (n - 1)
    return out


def model_signal(lines: Sequence[int], surprisal: Mapping[int, float] | None,
                 answer_line: int | None) -> dict[int, float]:
    """line -> the model's suspicion in [0, 1] from the surprisal rank and the debug answer's line."""
    ranks = surprisal_ranks({ln: surprisal.get(ln, 0.0) for ln in lines}) if surprisal else {}
    out = {}
    for ln in lines:
        r = ranks.get(ln, 0.5)
        a = 1.0 if answer_line == ln else 0.0
        out[ln] = (1 - ANSWER_SHARE) * r + ANSWER_SHARE * a if answer_line is not None else r
    return out


def rank(ev: Evidence, lines: Sequence[int], surprisal: Mapping[int, float] | None = None,
         answer_line: int | None = None, *, mode: str = "combined",
         model_weight: float | None = None, mutation: Mapping[int, float] | None = None,
         owner: Mapping[int, int] | None = None) -> list[Suspect]:
    """Lines from most to least suspicious. ``mode``: "combined", "ochiai" (evidence alone;
    ties keep file order) or "model" (the model alone). Without failing runs, "combined" is
    the model alone. ``mutation`` (line -> the largest share of failing runs one candidate
    change on that line made pass, from the repair step; Metallaxis-style mutation-based
    localisation) adds ``MUTATION_WEIGHT x`` that share. ``owner`` (from :func:`physical_lines`)
    maps a statement's later lines to its first line: they share its runs and its model signal
    and rank just below it, unless a candidate change on them made failing runs pass."""
    w = MODEL_WEIGHT if model_weight is None else model_weight
    owner = owner or {}
    heads = [ln for ln in lines if owner.get(ln, ln) == ln]
    och = ochiai(ev, lines, owner)
    mod = model_signal(heads, surprisal, answer_line)
    out = []
    for ln in lines:
        o, ef, ep = och[ln]
        head = owner.get(ln, ln)
        m = mod.get(head, 0.0)
        if mode == "ochiai":
            s = o
        elif mode == "model" or not ev.failing:
            s = m
        else:
            s = o + w * m
        if head != ln:
            s -= CONTINUATION_EPS * (1 + (ln - head) * 1e-3)
        if mutation and mode != "model":
            s += MUTATION_WEIGHT * mutation.get(ln, 0.0)
        out.append(Suspect(ln, s, o, m, ef, ep))
    out.sort(key=lambda x: (-x.score, x.line))
    return out


def top1_credit(ranked: Sequence[Suspect], bug_lines: set[int] | Sequence[int]) -> float:
    """Expected top-1 hit when ties at the top are broken at random (1/k for k tied lines)."""
    if not ranked:
        return 0.0
    best = ranked[0].score
    tied = [s.line for s in ranked if math.isclose(s.score, best, rel_tol=0, abs_tol=1e-12)]
    hits = sum(1 for ln in tied if ln in set(bug_lines))
    return hits / len(tied)
