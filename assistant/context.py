"""The context-window manager: a fill-in-the-middle prompt that fits the token budget.

For a document and a cursor (or a selection) plus optional related files, build
``<fim_suffix> suffix <fim_prefix> [related] prefix <fim_middle>`` (SPM, the default; PSM on request) within ``budget``
tokens (the model's context minus the room reserved for the answer), counted with the
model's tokenizer, and report what was trimmed.

What is kept, from first dropped to last kept (tree-sitter decides, distance breaks ties):

1. bodies of functions that do not enclose the cursor collapse to their signature and
   ``...`` — farthest first;
2. classes that do not enclose the cursor collapse to their header and ``...`` — farthest
   first;
3. the remaining lines (module statements, far lines of the enclosing function,
   collapsed definitions) are dropped by distance from the cursor — farthest first;
4. imports and the headers of the enclosing scopes are kept longest;
5. the lines at the cursor (or the selection) are always kept; only when they alone
   exceed the budget are they shortened, around the cursor, at character boundaries.

The budget left after the cursor lines is split between prefix and suffix
(``prefix_share``, default 0.7: the prefix gets the larger share, as in Continue and
Cody); what one side does not use goes to the other. Related files get up to
``related_share`` of the budget and whatever the document leaves.

Speed: pure Python over the tree-sitter scopes, token counts cached per line, and lines
are counted lazily — nearest first, stopping once the budget is full — so a 10,000-line
file costs little more than the lines that end up in the prompt. The plan is made with
per-line counts; the final prompt is then encoded exactly and re-planned with a smaller
budget in the rare case that joining lines changed the count.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from assistant import code as codemod
from model.data.repo_context import fit_related


@dataclass
class ContextReport:
    used_tokens: int
    budget: int
    trimmed: list[str] = field(default_factory=list)
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    related_tokens: int = 0
    collapsed_functions: list[str] = field(default_factory=list)
    collapsed_classes: list[str] = field(default_factory=list)
    dropped_prefix_lines: int = 0
    dropped_suffix_lines: int = 0

    def summary(self) -> str:
        head = f"context {self.used_tokens}/{self.budget} tokens"
        return head + ("; " + "; ".join(self.trimmed) if self.trimmed else "")


@dataclass
class ContextResult:
    prompt_ids: list[int]
    report: ContextReport
    prefix: str = ""  # the document text before the cursor, as it went into the prompt
    suffix: str = ""  # the document text after the cursor, as it went into the prompt


# -- token counting with a per-line cache ------------------------------------------------
class _Counter:
    __slots__ = ("tok", "cache", "calls")

    def __init__(self, tok: Any):
        self.tok = tok
        self.cache: dict[str, int] = {}
        self.calls = 0

    def __call__(self, text: str) -> int:
        c = self.cache.get(text)
        if c is None:
            self.calls += 1
            c = self.tok.count(text) if hasattr(self.tok, "count") else len(self.tok.encode(text))
            if len(self.cache) > 500_000:
                self.cache.clear()
            self.cache[text] = c
        return c


_COUNTERS: dict[int, _Counter] = {}


def line_counter(tok: Any) -> _Counter:
    """The cached counter for ``tok`` (one per tokenizer object)."""
    c = _COUNTERS.get(id(tok))
    if c is None or c.tok is not tok:
        if len(_COUNTERS) > 16:
            _COUNTERS.clear()
        c = _COUNTERS[id(tok)] = _Counter(tok)
    return c


# -- units of the plan ---------------------------------------------------------------------
@dataclass
class _Unit:
    """Something the plan can show: lines, a collapsed definition, or an expansion."""

    kind: str  # "keep" | "line" | "collapsed" | "expand_class" | "expand_func"
    lines: list[int] | range  # lines it makes visible (as themselves), before ``exclude``
    placeholders: list[tuple[int, str]] = field(default_factory=list)  # (line, "...") for hidden bodies
    replaces: str | None = None  # text of the placeholder an expansion replaces
    distance: int = 0
    name: str = ""
    cost: int | None = None
    exclude: set[int] | None = None  # lines of ``lines`` that stay hidden (or are shown by others)

    def visible(self) -> list[int] | range:
        if self.exclude is None:
            return self.lines
        ex = self.exclude
        return [j for j in self.lines if j not in ex]


class _Side:
    """One side (prefix or suffix) of the cursor: units in add order, resumable greedy."""

    def __init__(self, units: list[_Unit], count, src_lines: list[str]):
        self.units = units
        self.count = count
        self.src_lines = src_lines
        self.pos = 0  # next unit to add
        self.used = 0

    def cost(self, u: _Unit) -> int:
        if u.cost is None:
            count, src = self.count, self.src_lines
            c = sum(count(src[i] + "\n") for i in u.visible())
            c += sum(count(t + "\n") for _, t in u.placeholders)
            if u.replaces is not None:
                c -= count(u.replaces + "\n")
            u.cost = c
        return u.cost

    def fill(self, budget: int) -> None:
        """Add units in order while they fit in ``budget`` (total for this side)."""
        while self.pos < len(self.units):
            c = self.cost(self.units[self.pos])
            if self.used + c > budget:
                return
            self.used += c
            self.pos += 1

    @property
    def done(self) -> bool:
        return self.pos >= len(self.units)


def _plan_side(src_lines: list[str], lo: int, hi: int, cursor: int, keep: set[int],
               tops: list[codemod.Scope], exp_funcs: list[codemod.Scope], count) -> _Side:
    """Units of one side (lines ``lo..hi-1``) in add order, the reverse of the drop order."""
    before = hi <= cursor

    def dist(s: codemod.Scope) -> int:
        return cursor - s.end_line if before else s.decorated_start - cursor

    units: list[_Unit] = []
    # 1. keep-longest lines (imports, enclosing headers), nearest first
    ks = sorted((i for i in keep if lo <= i < hi), key=lambda i: abs(i - cursor))
    units.extend(_Unit("keep", [i], distance=abs(i - cursor)) for i in ks)

    # 2. remaining lines and collapsed definitions by distance (walk outward from the cursor)
    side_tops = [s for s in tops if s.decorated_start >= lo and s.end_line < hi]
    covers = {(s.end_line if before else s.decorated_start): s for s in side_tops}
    i = hi - 1 if before else lo
    step = -1 if before else 1
    while lo <= i < hi:
        s = covers.get(i)
        if s is not None:
            header = [j for j in range(s.decorated_start, s.body_start_line) if j not in keep]
            units.append(_Unit("collapsed", header, [(s.body_start_line, s.body_indent + "...")],
                               distance=dist(s), name=s.qualname))
            i = s.decorated_start - 1 if before else s.end_line + 1
            continue
        if i not in keep:
            units.append(_Unit("line", [i], distance=abs(i - cursor)))
        i += step

    # 3. class expansions (body shown, methods collapsed), then 4. function bodies; nearest first
    cls_exp: list[_Unit] = []
    funcs_by_start = sorted(exp_funcs, key=lambda f: f.decorated_start)
    starts = [f.decorated_start for f in funcs_by_start]
    for s in side_tops:
        if s.kind != "class":
            continue
        hidden: set[int] = set(keep)
        phs: list[tuple[int, str]] = []
        for k in range(bisect.bisect_left(starts, s.start_line), bisect.bisect_right(starts, s.end_line)):
            f = funcs_by_start[k]
            if f.end_line <= s.end_line:
                hidden.update(range(f.body_start_line, f.end_line + 1))
                phs.append((f.body_start_line, f.body_indent + "..."))
        cls_exp.append(_Unit("expand_class", range(s.body_start_line, s.end_line + 1), phs,
                             replaces=s.body_indent + "...", distance=dist(s), name=s.qualname, exclude=hidden))
    func_exp = [
        _Unit("expand_func", range(f.body_start_line, f.end_line + 1), replaces=f.body_indent + "...",
              distance=dist(f), name=f.qualname, exclude=keep)
        for f in exp_funcs if f.decorated_start >= lo and f.end_line < hi
    ]
    cls_exp.sort(key=lambda u: u.distance)
    func_exp.sort(key=lambda u: u.distance)
    return _Side(units + cls_exp + func_exp, count, src_lines)


# -- the public functions ---------------------------------------------------------------
WINDOW_CHARS_PER_TOKEN = 16  # a coarse pre-cut keeps ~4x the budget at ~4 characters a token


def source_window(source: str, line: int, budget: int, prefix_share: float = 0.75) -> tuple[str, int]:
    """A cheap cut of a long ``source`` to the lines around 0-based ``line`` (about
    ``budget x WINDOW_CHARS_PER_TOKEN`` characters, ``prefix_share`` of them before the
    line), so that parsing and trimming cost is bounded by the budget, not the file
    (a 100,000-line file completes as fast as a short one). Returns (window, the line's
    index in it); short sources come back whole. :func:`build_context` then fits the
    window into the budget, tree-sitter aware."""
    limit = budget * WINDOW_CHARS_PER_TOKEN
    if len(source) <= limit:
        return source, line
    lines = source.split("\n")
    lo = hi = line
    used = len(lines[line]) + 1
    before = limit * prefix_share
    while lo > 0 and used + len(lines[lo - 1]) + 1 <= before:
        lo -= 1
        used += len(lines[lo]) + 1
    while hi < len(lines) - 1 and used + len(lines[hi + 1]) + 1 <= limit:
        hi += 1
        used += len(lines[hi]) + 1
    while lo > 0 and used + len(lines[lo - 1]) + 1 <= limit:  # the suffix was short
        lo -= 1
        used += len(lines[lo]) + 1
    return "\n".join(lines[lo:hi + 1]), line - lo


def build_context(
    tokenizer: Any,
    source: str,
    line: int,
    column: int = 0,
    *,
    budget: int,
    related: list[tuple[str, str]] | tuple = (),
    prefix_share: float = 0.7,
    related_share: float = 0.15,
    end_line: int | None = None,
    spm: bool | None = None,  # None: the tokenizer's ``fim_spm`` (the shipped model: SPM, model.formats.fim_prompt)
    related_sep: bool = True,
) -> ContextResult:
    """The FIM prompt for a cursor at (0-based) ``line``, ``column`` within ``budget`` tokens.

    ``end_line`` (inclusive) makes lines ``line..end_line`` a selection that is kept whole;
    the cursor is then at its end. ``related`` are ``(path, text)`` pairs of other files, each
    after a ``<|file_sep|>`` token (``related_sep``) or, without it, as plain code headed by a
    ``# path`` comment.
    Raises ValueError when the budget cannot even hold the special tokens.

    A tokenizer with ``has_fim`` False (an open checkpoint without FIM tokens) gets a
    prefix-only prompt: related files, then the text before the cursor, no suffix.
    """
    tok = tokenizer
    if spm is None:
        spm = getattr(tok, "fim_spm", True)
    fim = getattr(tok, "has_fim", True)
    if not fim:  # complete from the prefix only: the text after the cursor never enters the prompt
        lines_ = source.split("\n")
        ln = min(max(line if end_line is None else end_line, 0), len(lines_) - 1)
        col = len(lines_[ln]) if end_line is not None else min(max(column, 0), len(lines_[ln]))
        source = "\n".join(lines_[:ln] + [lines_[ln][:col]])
        line, column, end_line = ln, col, None
    count = line_counter(tok)
    src_lines = source.split("\n")
    n = len(src_lines)
    line = min(max(line, 0), n - 1)
    keep_lo = line
    if end_line is not None:
        end_line = min(max(end_line, line), n - 1)
        keep_lo, line = line, end_line
        column = len(src_lines[line])
    column = min(max(column, 0), len(src_lines[line]))
    overhead = 3 if fim else 0
    if budget < max(overhead, 1):
        raise ValueError(f"context budget {budget} is too small (needs at least {overhead} tokens)")

    rel_items = [(p, t) for p, t in related if t]
    rel_need = 0
    if rel_items:
        rel_need = sum(count(f"# {p}\n") + 1 for p, t in rel_items) + 1 + sum(
            count(x + "\n") for _, t in rel_items for x in t.split("\n"))
    text_budget = budget - overhead
    rel_reserve = min(rel_need, int(text_budget * related_share)) if rel_items else 0

    # Re-plan with a smaller budget if exact encoding overshoots the per-line estimate.
    slack = 0
    for _attempt in range(10):
        plan = _plan(tok, count, source, src_lines, line, column, keep_lo, max(0, text_budget - rel_reserve - slack),
                     prefix_share)
        prefix_text, suffix_text, report = plan
        rel_ids, rel_report = _fit_related(tok, count, rel_items,
                                           max(0, text_budget - slack - report.prefix_tokens - report.suffix_tokens),
                                           sep=related_sep)
        if len(rel_ids) < rel_reserve:  # the related files did not use their share: give it back
            rel_reserve = len(rel_ids)
            continue
        pre_ids = tok.encode(prefix_text)
        suf_ids = tok.encode(suffix_text)
        total = overhead + len(rel_ids) + len(pre_ids) + len(suf_ids)
        if total <= budget:
            break
        slack += total - budget + 1 + slack // 2
    else:  # pragma: no cover - per-line estimates far off: cut characters, exactly counted
        rel_ids, rel_report = [], ["dropped related files"] if rel_items else []
        prefix_text, suffix_text = _cut_exact(tok, prefix_text, suffix_text, budget - overhead, prefix_share)
        pre_ids, suf_ids = tok.encode(prefix_text), tok.encode(suffix_text)
        report.trimmed.append("cut characters to fit exactly")
        total = overhead + len(pre_ids) + len(suf_ids)

    if not fim:
        ids = [*rel_ids, *pre_ids]
        report.trimmed.append("prefix only (the model has no fill-in-the-middle tokens)")
    elif spm:
        p, s, m = tok.special_id("fim_prefix"), tok.special_id("fim_suffix"), tok.special_id("fim_middle")
        ids = [s, *suf_ids, p, *rel_ids, *pre_ids, m]
    else:
        p, s, m = tok.special_id("fim_prefix"), tok.special_id("fim_suffix"), tok.special_id("fim_middle")
        ids = [p, *rel_ids, *pre_ids, s, *suf_ids, m]
    report.trimmed.extend(rel_report)
    report.used_tokens = len(ids)
    report.budget = budget
    report.prefix_tokens = len(pre_ids)
    report.suffix_tokens = len(suf_ids)
    report.related_tokens = len(rel_ids)
    return ContextResult(ids, report, prefix_text, suffix_text)


_fit_related = fit_related  # the one renderer of the related slot (model.data.repo_context)


def _plan(tok, count, source, src_lines, line, column, keep_lo, budget, prefix_share):
    n = len(src_lines)
    cur = src_lines[line]
    cur_pre, cur_suf = cur[:column], cur[column:]
    report = ContextReport(0, budget)
    # the mandatory lines: the selection (keep_lo..line) and the cursor line
    mand_pre_lines = list(range(keep_lo, line))
    mand_cost = count(cur_pre) + count(cur_suf) + sum(count(src_lines[i] + "\n") for i in mand_pre_lines)
    if mand_cost > budget:
        if mand_pre_lines:
            report.trimmed.append(f"dropped {len(mand_pre_lines)} selected lines above the cursor")
            mand_pre_lines = []
        cur_pre, cur_suf = _cut_exact(tok, cur_pre, cur_suf, budget, prefix_share)
        report.trimmed.append("shortened the cursor line around the cursor")
        report.used_tokens = budget
        pre_text = cur_pre
        return pre_text, cur_suf, _finish_report(report, budget, 0, line, n)
    rest = budget - mand_cost

    tree_scopes = codemod.scopes(source)
    enclosing = [s for s in tree_scopes if s.decorated_start <= line <= s.end_line or
                 (keep_lo < s.decorated_start <= line)]
    enclosing_names = {s.qualname for s in enclosing}
    keep: set[int] = set(codemod.import_lines(source))
    for s in enclosing:
        keep.update(range(s.decorated_start, max(s.body_start_line, s.start_line + 1)))
    keep.discard(line)
    keep.difference_update(mand_pre_lines)

    # collapsible scopes: not enclosing the cursor or the selection, with a body on lines of its own
    coll: dict[str, codemod.Scope] = {}
    for s in tree_scopes:
        if s.qualname in enclosing_names or (s.decorated_start <= line and s.end_line >= keep_lo):
            continue
        if s.body_start_line <= s.start_line:
            continue
        coll[s.qualname] = s
    # top-most ones (not inside another collapsible scope) are the units of the distance walk;
    # functions not nested in a collapsible function expand on their own (methods included)
    tops = [s for s in coll.values() if not (s.parent and s.parent in coll)]
    exp_funcs = [s for s in coll.values() if s.kind == "function"
                 and not _inside_collapsible_function(s, coll)]

    pre_side = _plan_side(src_lines, 0, keep_lo, line, keep, tops, exp_funcs, count)
    suf_side = _plan_side(src_lines, line + 1, n, line, keep, tops, exp_funcs, count)
    share_pre = int(rest * prefix_share)
    suf_side.fill(rest - share_pre)
    pre_side.fill(rest - suf_side.used)
    if pre_side.done:
        suf_side.fill(rest - pre_side.used)

    pre_text = _render(src_lines, pre_side, 0, keep_lo)
    if mand_pre_lines:
        pre_text += "".join(src_lines[i] + "\n" for i in mand_pre_lines)
    pre_text += cur_pre
    suf_text = cur_suf + ("\n" + _render(src_lines, suf_side, line + 1, n) if line + 1 < n else "")
    if suf_text.endswith("\n") and line + 1 < n:
        suf_text = suf_text[:-1]
    _describe(report, pre_side, "before", src_lines, 0, keep_lo)
    _describe(report, suf_side, "after", src_lines, line + 1, n)
    report.prefix_tokens = pre_side.used + mand_cost - count(cur_suf)
    report.suffix_tokens = suf_side.used + count(cur_suf)
    return pre_text, suf_text, report


def _render(src_lines: list[str], side: _Side, lo: int, hi: int) -> str:
    """The visible text of lines ``lo..hi-1`` after adding ``side.units[:side.pos]``."""
    if hi <= lo:
        return ""
    added = side.units[: side.pos]
    if len(added) == len(side.units):  # everything shown: the original text
        return "\n".join(src_lines[lo:hi]) + "\n"
    show: set[int] = set()
    ph: dict[int, str] = {}
    for u in added:
        show.update(u.visible())
        for ln, text in u.placeholders:
            ph[ln] = text
    for u in added:  # expanded function bodies replace their placeholders
        if u.kind == "expand_func":
            for ln in u.lines:
                ph.pop(ln, None)
    out = []
    for i in sorted(show | ph.keys()):
        out.append(src_lines[i] if i in show else ph[i])
    return "".join(x + "\n" for x in out)


def _inside_collapsible_function(s: codemod.Scope, coll: dict[str, codemod.Scope]) -> bool:
    p = s.parent
    while p is not None:
        ps = coll.get(p)
        if ps is not None and ps.kind == "function":
            return True
        p = p.rsplit(".", 1)[0] if "." in p else None
    return False


def _describe(report: ContextReport, side: _Side, where: str, src_lines, lo: int, hi: int) -> None:
    added = side.units[: side.pos]
    skipped = side.units[side.pos:]
    expanded = {u.name for u in added if u.kind.startswith("expand")}
    visible_defs = {u.name for u in added if u.kind == "collapsed"}
    coll_f = [u.name for u in skipped if u.kind == "expand_func" and (u.name in visible_defs or
                                                                      _parent_visible(u.name, expanded))]
    coll_c = [u.name for u in skipped if u.kind == "expand_class" and u.name in visible_defs]
    dropped = 0
    for u in skipped:
        if u.kind in ("keep", "line", "collapsed"):
            dropped += len(u.lines) + (1 if u.kind == "collapsed" else 0)
    if coll_f:
        report.collapsed_functions += coll_f
        report.trimmed.append(f"collapsed {len(coll_f)} function bod{'y' if len(coll_f) == 1 else 'ies'} {where} "
                              f"the cursor to signatures: {_names(coll_f)}")
    if coll_c:
        report.collapsed_classes += coll_c
        report.trimmed.append(f"collapsed {len(coll_c)} class{'es' if len(coll_c) > 1 else ''} {where} the cursor "
                              f"to names: {_names(coll_c)}")
    if dropped:
        if where == "before":
            report.dropped_prefix_lines = dropped
        else:
            report.dropped_suffix_lines = dropped
        kinds = {u.kind for u in skipped}
        extra = " (imports / enclosing headers included)" if "keep" in kinds else ""
        report.trimmed.append(f"dropped {dropped} line{'s' if dropped != 1 else ''} {where} the cursor{extra}")


def _parent_visible(name: str, expanded: set[str]) -> bool:
    return "." in name and name.rsplit(".", 1)[0] in expanded


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _finish_report(report: ContextReport, pre: int, suf: int, line: int, n: int) -> ContextReport:
    report.prefix_tokens, report.suffix_tokens = pre, suf
    return report


def _cut_exact(tok, pre: str, suf: str, budget: int, prefix_share: float) -> tuple[str, str]:
    """Keep the end of ``pre`` and the start of ``suf`` within ``budget`` exact tokens.

    Cuts only at character boundaries (Python strings), so never inside a UTF-8 sequence.
    """
    def fits_pre(k: int, b: int) -> bool:
        return len(tok.encode(pre[len(pre) - k:])) <= b

    def fits_suf(k: int, b: int) -> bool:
        return len(tok.encode(suf[:k])) <= b

    def longest(fits, total: int, b: int) -> int:
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid, b):
                lo = mid
            else:
                hi = mid - 1
        return lo

    b_pre = int(budget * prefix_share)
    kp = longest(fits_pre, len(pre), b_pre)
    used = len(tok.encode(pre[len(pre) - kp:])) if kp else 0
    ks = longest(fits_suf, len(suf), budget - used)
    used_s = len(tok.encode(suf[:ks])) if ks else 0
    if ks == len(suf):
        kp = longest(fits_pre, len(pre), budget - used_s)
    return pre[len(pre) - kp:], suf[:ks]
