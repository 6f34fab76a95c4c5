"""Debugging from evidence: run the examples and tests, localise, repair, verify.

:func:`debug_stream` is what every face calls when the user asked to run code (``moecoder
debug --run``, ``moecoder review --run``, the LSP's "Find the bug (runs examples)", the chat's
``/debug``). For each function it

1. runs the evidence (:mod:`assistant.evidence`: doctest examples, the repository's tests
   that call it, the user's ``--tests``) in the sandbox with per-run coverage;
2. ranks its lines (:mod:`assistant.localize`: Ochiai over the failing and passing runs plus
   the model's line surprisal and debug answer);
3. for the most suspicious lines, checks candidate fixes (:mod:`assistant.repair`: the
   model's proposals and cheap mutations) by running the evidence on each, keeping those that
   make every failing run pass and keep every passing run passing, ranked by the model's
   likelihood; with nothing verified and time left, the next lines down the ranking. A fix
   after which some line the runs used to reach is reached by none (``x < a[m]`` -> ``x !=
   a[m]``, so the other branch never runs) made the tests pass by cutting behaviour out: it is
   not verified, and the line it cut out, if failing runs executed it, is named as the fault;
   nor is a fix after which two branches of a conditional do the same thing;
4. streams reasoning that cites the evidence, then the answer: a :class:`DebugResult` whose
   hints say what backs them (``Hint.evidence``: "verified" — a fix made every run pass,
   high confidence; "runs" — failing runs point at the line, no fix verified; "model" — no
   failing run, the model's hint alone, lower confidence).

Nothing here runs unless a face was told to (a flag, a setting, a code action).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from assistant import evidence as evmod
from assistant import localize, repair
from assistant.engine import Event
from assistant.tasks import DebugResult, Hint, TaskRequest

VERIFIED_CONFIDENCE = 0.95  # a fix that makes every failing run pass and keeps the passing ones
PLAUSIBLE_CONFIDENCE = 0.75  # fixes pass every run but disagree with each other on derived inputs
RUNS_CONFIDENCE = 0.6  # failing runs, no verified fix: the top line by the spectrum
MODEL_ONLY_FACTOR = 0.8  # nothing ran: the model's own confidence, lowered
ALL_PASS_CAP = 0.3  # every run passes: a model hint stays below the review's default threshold


@dataclass
class DebugOptions:
    tests: Sequence[str] = ()  # user --tests paths / node ids
    repo_tests: bool = True  # look for the repository's tests that call the function
    doctests: bool = True
    use_model: bool = True  # the model's surprisal, answer and line proposals
    top_lines: int = 5  # lines to try fixes on
    budget_s: float = 90.0  # per function, evidence and repair together
    per_run_timeout: float = 2.0
    chunk: int = 30  # candidates per sandbox process (progress between chunks)
    max_verified: int = 6  # stop looking once this many fixes are verified
    keep_going: bool = False  # check every candidate (for measurement) instead of stopping early
    widen: bool = True  # nothing verified on the top lines and time left: try the next lines down
    coverage_check: bool = True  # a fix that leaves a line the runs reached unreached is not verified
    rivals: bool = True  # once a fix is verified, check the rest of its round for rival fixes
    differential: bool = True  # call the original and the fixes on inputs derived from the evidence


@dataclass
class FunctionReport:
    """Everything measured for one function (for the evaluation and --json)."""

    function: str
    evidence: evmod.Evidence
    ranked: list[localize.Suspect] = field(default_factory=list)
    ranked_ochiai: list[localize.Suspect] = field(default_factory=list)
    ranked_model: list[localize.Suspect] = field(default_factory=list)
    model_line: int | None = None  # 1-based line of the model's debug answer
    model_hint: Hint | None = None
    verified: list[tuple[repair.Candidate, float]] = field(default_factory=list)  # with the model score
    suspicious: list[tuple[repair.Candidate, list[int]]] = field(default_factory=list)  # pass, but lines lost
    crashing: list[tuple[repair.Candidate, str]] = field(default_factory=list)  # pass, but hang on derived inputs
    plausible: bool = False  # verified fixes disagree on derived inputs: the best one is only plausible
    probe_inputs: int = 0  # inputs derived from the evidence's calls (differential testing)
    disagreement: str = ""  # an input on which two fixes that pass every run disagree
    mutation: dict[int, float] = field(default_factory=dict)  # line -> most failing runs a candidate fixed
    ranked_final: list[localize.Suspect] = field(default_factory=list)  # with the candidates' outcomes
    tried: int = 0
    mode: str = "model"  # "verified" | "runs" | "passing" | "model"
    seconds: float = 0.0


def _q(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def describe_run(r: evmod.Run) -> str:
    """One clause citing a run: "`f(3)` returned 5, the docstring expects 6"."""
    if r.kind == "doctest":
        src = _q(r.source.strip().splitlines()[0] if r.source.strip() else r.id)
        if r.outcome == "timeout":
            return f"`{src}` did not finish ({r.message})"
        if r.outcome == "crashed":
            return f"`{src}` stopped the process ({r.message})"
        want = _q(r.want.strip(), 40) or "no output"
        if r.message.startswith("raised"):
            return f"`{src}` {_q(r.message, 90)}, the docstring expects {want}"
        return f"`{src}` returned {_q(r.got.strip(), 40) or 'nothing'}, the docstring expects {want}"
    name = r.id.split("::", 1)[-1]
    msg = r.message.split(" Use -v to get")[0].split("\nUse -v")[0]
    r = evmod.Run(r.id, r.kind, r.outcome, msg, r.lines)
    if r.outcome == "timeout":
        return f"`{_q(name, 60)}` did not finish ({r.message})"
    if r.outcome == "crashed":
        return f"`{_q(name, 60)}` stopped the process ({r.message})"
    return f"`{_q(name, 60)}` failed: {_q(r.message, 90)}"


def _plural(n: int, word: str) -> str:
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word}" + ("es" if word.endswith(("x", "s")) else "s")


def _model_signals(engine: Any, source: str, path: str | None, function: str, lines: Sequence[int],
                   ) -> tuple[dict[int, float], Hint | None]:
    from assistant.tasks import line_surprisal

    src_lines = source.split("\n")
    surprisal: dict[int, float] = {}
    try:
        vals = engine.submit(lambda: line_surprisal(engine, [src_lines[ln - 1] for ln in lines]))
        surprisal = dict(zip(lines, vals))
    except Exception:  # noqa: BLE001 - a backend without log-probabilities: no surprisal
        surprisal = {}
    hint = None
    try:
        res = engine.run(TaskRequest("debug", source, path, function=function))
        if isinstance(res, DebugResult) and res.hints:
            hint = res.hints[0]
    except Exception:  # noqa: BLE001 - the model's answer is one signal among others
        hint = None
    return surprisal, hint


def debug_function(engine: Any, tgt: evmod.Target, function: str, path: str | None = None,
                   opts: DebugOptions | None = None, emit: Callable[[str], None] | None = None,
                   ) -> tuple[DebugResult, FunctionReport]:
    """Evidence, localisation and repair for one function; ``emit`` receives reasoning text
    as it is written."""
    opts = opts or DebugOptions()
    t0 = time.monotonic()
    deadline = t0 + opts.budget_s
    parts: list[str] = []

    def say(text: str) -> None:
        parts.append(text)
        if emit:
            emit(text)

    source = tgt.source
    src_lines = source.split("\n")
    span = evmod.function_span(source, function)
    if span is None:
        rep = FunctionReport(function, evmod.Evidence(function, 0, 0))
        return DebugResult([], f"no function named {function!r}"), rep
    n_ex = len(tgt.examples.get(function, []))
    n_tests = len(tgt.tests.get(function, []))
    if n_ex or n_tests:
        what = " and ".join(x for x in (_plural(n_ex, "doctest example") if n_ex else "",
                                        _plural(n_tests, "test") if n_tests else "") if x)
        say(f"Running {what} for `{function}` in the sandbox. ")
    ev = evmod.gather(tgt, function, per_run_timeout=opts.per_run_timeout,
                      timeout=max(5.0, min(opts.budget_s * 0.4, deadline - time.monotonic())))
    rep = FunctionReport(function, ev)
    for p in ev.problems[:3]:
        say(f"Problem: {_q(p, 160)}. ")
    lines = localize.statement_lines(source, span[0], span[1])
    owner = localize.physical_lines(source, span[0], span[1])  # + later lines of long statements
    all_lines = list(owner)
    surprisal: dict[int, float] = {}
    mhint: Hint | None = None
    if engine is not None and opts.use_model and lines:
        surprisal, mhint = _model_signals(engine, source, path, function, lines)
    rep.model_hint = mhint
    rep.model_line = mhint.line + 1 if mhint is not None else None
    rep.ranked = localize.rank(ev, all_lines, surprisal, rep.model_line, owner=owner)
    rep.ranked_ochiai = localize.rank(ev, all_lines, surprisal, rep.model_line, mode="ochiai", owner=owner)
    rep.ranked_model = localize.rank(ev, all_lines, surprisal, rep.model_line, mode="model", owner=owner)

    def finish(hints: list[Hint], mode: str) -> tuple[DebugResult, FunctionReport]:
        rep.mode = mode
        rep.seconds = time.monotonic() - t0
        text = "".join(parts).strip()
        for h in hints:
            h.reasoning = text
        return DebugResult(hints, text), rep

    if not ev.failing:
        if ev.runs:
            say(f"All {_plural(len(ev.runs), 'run')} pass ({ev.summary()}): no evidence of a bug. ")
        elif ev.collected:
            say("None of the runs reached the function. ")
        else:
            say(f"Nothing to run for `{function}` (no doctest examples, no tests that call it). ")
        if mhint is None:
            say("The model sees no issue either.")
            return finish([], "passing" if ev.runs else "model")
        cap = ALL_PASS_CAP if ev.runs else None
        conf = mhint.confidence * MODEL_ONLY_FACTOR
        if cap is not None:
            conf = min(conf, cap)
        say(f"The model alone suspects line {mhint.line + 1} (model-only, lower confidence): {_q(mhint.message, 120)}")
        h = Hint(path, function, mhint.line, "[model only] " + mhint.message, mhint.fix, round(conf, 3), "",
                 evidence="model")
        return finish([h], "passing" if ev.runs else "model")

    # ---- failing runs: cite them, localise
    fails = ev.failing
    say(f"{ev.summary()}: " + "; ".join(describe_run(r) for r in fails[:2])
        + (f"; and {len(fails) - 2} more" if len(fails) > 2 else "") + ". ")
    top = rep.ranked[0]
    P = len(ev.passing)
    say(f"Line {top.line} (`{_q(src_lines[top.line - 1].strip(), 50)}`) runs in {top.failing} of "
        f"{len(fails)} failing runs and in {top.passing} of {P} passing ones (Ochiai {top.ochiai:.2f}"
        + (f"; the model ranks it {top.model:.2f}" if surprisal or rep.model_line else "") + "). ")

    # ---- repair: candidates on the top lines, checked by running the evidence; while the
    # budget lasts and nothing is verified, the next lines down the ranking (in rounds of
    # ``top_lines`` statements)
    heads = [s.line for s in rep.ranked if s.ochiai > 0 and owner.get(s.line, s.line) == s.line] \
        or [owner.get(top.line, top.line)]
    rounds = [heads[i:i + opts.top_lines] for i in range(0, len(heads), opts.top_lines)]
    if not opts.widen:
        rounds = rounds[:1]
    verified: list[repair.Candidate] = []
    suspicious: list[tuple[repair.Candidate, list[int]]] = []  # make the runs pass, but leave lines unreached
    done = 0
    fail_ids = {r.id for r in fails}
    pass_ids = {r.id for r in ev.passing}
    mut: dict[int, float] = {}
    crashing: list[tuple[repair.Candidate, str]] = []  # pass the runs, hang where the original returned
    outcomes: dict[int, dict[str, tuple[str, ...]]] = {}  # id(candidate) -> derived input -> its outcome
    base_out: dict[str, tuple[str, ...]] = {}  # derived input -> the original's outcome
    reached = frozenset().union(*(r.lines for r in ev.runs)) & set(lines)
    for r_i, try_heads in enumerate(rounds):
        if r_i and deadline - time.monotonic() < 5:
            break
        # a statement over several lines: each of its lines gets candidates (the head's first)
        try_lines = [ln for h in try_heads for ln in [h, *(c for c, o in owner.items() if o == h and c != h)]]
        proposals: dict[int, list[tuple[str, str]]] = {ln: [] for ln in try_lines}
        if mhint is not None and mhint.fix and mhint.line + 1 in proposals:
            proposals[mhint.line + 1].append((mhint.fix, "the model's fix"))
        if engine is not None and opts.use_model and r_i == 0:
            for ln in try_heads:
                if time.monotonic() > deadline - 5:
                    break
                proposals[ln] += repair.model_line_proposals(engine, source, ln, path)
        per_line = [repair.candidates_for(source, ln, proposals[ln], fragment=owner.get(ln, ln) != ln)
                    for ln in try_lines]
        order = {h: i for i, h in enumerate(try_heads)}
        ordered: list[repair.Candidate] = [c for cs in per_line for c in cs if c.origin == "model"]
        muts = [(c.prior, order[owner.get(c.line, c.line)], c.line, c) for cs in per_line for c in cs
                if c.origin == "mutation"]
        ordered += [c for *_, c in sorted(muts, key=lambda x: (x[0], x[1], x[2]))]
        if r_i:
            say("\nNo fix verified there; the next lines down the ranking. ")
        say(f"Trying {_plural(len(ordered), 'candidate fix')} on line{'s' if len(try_lines) > 1 else ''} "
            f"{', '.join(map(str, try_lines))}: ")
        stop = False
        for k in range(0, len(ordered), opts.chunk):
            left = deadline - time.monotonic()
            if left < 2:
                say(f"(time budget spent after {done}) ")
                stop = True
                break
            chunk = ordered[k:k + opts.chunk]
            ok, runs = evmod.check_candidates(tgt, ev, [(f"c{k + i}", c.apply(source)) for i, c in enumerate(chunk)],
                                              per_run_timeout=2 * opts.per_run_timeout, timeout=max(1.0, left),
                                              through_failing=True)
            done += len(chunk)
            new: list[repair.Candidate] = []
            for i, c in enumerate(chunk):
                got = runs.get(f"c{k + i}", [])
                fixed = len({r.id for r in got if r.passed} & fail_ids) / len(fail_ids)
                broke = any(not r.passed for r in got if r.id in pass_ids)
                mut[c.line] = max(mut.get(c.line, 0.0), 0.0 if broke else fixed)
                if ok.get(f"c{k + i}"):
                    new.append(c)
            if new and opts.coverage_check:
                # a fix after which two branches of a conditional do the same thing made the
                # condition pointless: the tests passing says nothing about it
                same = [c for c in new if repair.makes_branches_identical(source, c.apply(source), span[0], span[1])]
                suspicious += [(c, []) for c in same]
                new = [c for c in new if c not in same]
            if new and opts.coverage_check:
                # a fix should keep every line the runs reached reachable: one that leaves a
                # line unreached by every run made the tests pass by cutting behaviour out
                cov = evmod.coverage_of(tgt, ev, [(f"v{i}", c.apply(source)) for i, c in enumerate(new)],
                                        per_run_timeout=2 * opts.per_run_timeout,  # tracing is slower
                                        timeout=max(2.0, min(20.0, deadline - time.monotonic())))
                kept = []
                for i, c in enumerate(new):
                    after = cov.get(f"v{i}")
                    lost = sorted(reached - after) if after is not None else []
                    if lost:
                        suspicious.append((c, lost))
                    else:
                        kept.append(c)
                new = kept
            if new and opts.differential:
                # call the original and the new fixes on inputs derived from the evidence's calls:
                # a fix that hangs or recurses without end where the original returned is not verified
                pr = evmod.probe(tgt, ev, [(f"p{i}", c.apply(source)) for i, c in enumerate(new)],
                                 timeout=max(2.0, min(20.0, deadline - time.monotonic())))
                if pr is not None:
                    base_now = pr.results["base"]
                    base_out.update(zip(pr.inputs, base_now))
                    rep.probe_inputs = max(rep.probe_inputs, len(pr.inputs))
                    kept = []
                    for i, c in enumerate(new):
                        got = pr.results.get(f"p{i}")
                        if got is None:
                            kept.append(c)
                            continue
                        bad = [j for j, (a, b) in enumerate(zip(base_now, got)) if a[0] == "ok" and _stuck(b)]
                        if bad:
                            j = bad[0]
                            what = "does not finish" if got[j][0] == "timeout" else "recurses without end"
                            crashing.append((c, f"on `{_q(_call_text(function, pr.inputs[j]), 60)}` it {what} where "
                                                f"the original returned"))
                        else:
                            outcomes[id(c)] = dict(zip(pr.inputs, got))
                            kept.append(c)
                    new = kept
            verified += new
            say(f"{done} checked{f', {len(verified)} verified' if verified else ''}"
                f"{f', {len(suspicious)} passing but cutting code out' if suspicious else ''}"
                f"{f', {len(crashing)} passing but not finishing on inputs derived from the runs' if crashing else ''}; ")
            if verified and (len(verified) >= opts.max_verified or not (opts.keep_going or opts.rivals)):
                stop = True
                break
        if stop or (verified and not opts.keep_going):
            break
    rep.mutation = mut
    rep.suspicious = suspicious
    rep.crashing = crashing
    rep.ranked_final = localize.rank(ev, all_lines, surprisal, rep.model_line, mutation=mut, owner=owner)
    rep.tried = done
    scored: list[tuple[repair.Candidate, float]] = []
    for c in verified:
        score = 0.0
        if engine is not None and opts.use_model:
            fn_text = "\n".join(c.apply(source).split("\n")[span[0] - 1: span[1]])
            try:
                score = engine.submit(lambda t=fn_text: repair.function_logprob(engine, t))
            except Exception:  # noqa: BLE001
                score = 0.0
        else:
            score = -float(c.prior)
        scored.append((c, score))
    scored.sort(key=lambda x: -x[1])
    n_runs = len(ev.runs)
    verdict = _differential(scored, outcomes, base_out, function) if scored else None
    if verdict is not None:
        scored, rep.plausible, rep.disagreement, note = verdict
        if note:
            say(f"\n{note}")
    if scored:
        # fixes that rank alike and behave alike on every derived input: the shortest line first
        # (``range(len(v))`` over ``range(len(v) * 1)``)
        key = outcomes.get(id(scored[0][0]))

        def alike(other: dict[str, tuple[str, ...]] | None) -> bool:
            common = set(key or {}) & set(other or {})
            return bool(common) and all(key[k] == other[k] for k in common)  # type: ignore[index]

        same = [x for x in scored if x[1] == scored[0][1] and (x is scored[0] or alike(outcomes.get(id(x[0]))))]
        first = min(same, key=lambda x: len(x[0].text.strip()))
        scored = [first, *(x for x in scored if x is not first)]
    rep.verified = scored
    if scored and rep.plausible:
        best = scored[0][0]
        say(f"\nThe best-ranked of them replaces line {best.line} with `{_q(best.text.strip(), 60)}` ({best.how}): "
            "plausible, not verified.")
        msg = (f"{best.how}: makes all {_plural(n_runs, 'run')} pass, but so do other fixes that disagree with it on "
               "inputs derived from the runs (plausible, not verified)")
        return finish([Hint(path, function, best.line - 1, msg, best.text, PLAUSIBLE_CONFIDENCE, "",
                            evidence="plausible")], "plausible")
    if scored:
        best = scored[0][0]
        say(f"\nReplacing line {best.line} with `{_q(best.text.strip(), 60)}` ({best.how}) makes all "
            f"{_plural(n_runs, 'run')} pass ({len(fails)} failed before)"
            + (f"; {len(scored) - 1} other verified fix{'es rank' if len(scored) > 2 else ' ranks'} lower"
               if len(scored) > 1 else "") + ".")
        msg = f"{best.how}: makes all {_plural(n_runs, 'run')} pass (verified)"
        return finish([Hint(path, function, best.line - 1, msg, best.text, VERIFIED_CONFIDENCE, "",
                            evidence="verified")], "verified")
    if suspicious and not suspicious[0][1]:
        c = suspicious[0][0]
        say(f"\nReplacing line {c.line} with `{_q(c.text.strip(), 60)}` ({c.how}) makes all "
            f"{_plural(n_runs, 'run')} pass, but then two branches of a condition do the same thing: the "
            "condition no longer matters, so the tests do not confirm it.")
        msg = f"{c.how}: makes all {_plural(n_runs, 'run')} pass but makes two branches identical (not verified)"
        return finish([Hint(path, function, c.line - 1, msg, c.text, RUNS_CONFIDENCE, "", evidence="runs")], "runs")
    if suspicious:
        c, lost = suspicious[0]
        where = ", ".join(map(str, lost[:4])) + (" ..." if len(lost) > 4 else "")
        say(f"\nReplacing line {c.line} with `{_q(c.text.strip(), 60)}` ({c.how}) makes all "
            f"{_plural(n_runs, 'run')} pass, but then no run reaches line{'s' if len(lost) > 1 else ''} {where} "
            "any more: it cuts behaviour out rather than repairs it, so the tests do not confirm it.")
        # the failing runs pass once a line they executed is no longer reached: that line's
        # behaviour is the likely fault (the cut names it, it does not repair it)
        by_line = {s_.line: s_ for s_ in rep.ranked}
        pos = {s_.line: i for i, s_ in enumerate(rep.ranked)}
        culprits = sorted((ln for ln in lost if ln in by_line and by_line[ln].failing), key=lambda ln: pos[ln])
        if culprits:
            bad = by_line[culprits[0]]
            say(f" Line {bad.line} runs in {bad.failing} of {len(fails)} failing runs, and they all pass once it "
                f"is no longer reached: line {bad.line} is the likely fault.")
            msg = (f"runs in {bad.failing} of {len(fails)} failing runs, which all pass once it is no longer reached "
                   f"({c.how} on line {c.line}); no verified fix")
            return finish([Hint(path, function, bad.line - 1, msg, None, RUNS_CONFIDENCE, "", evidence="runs")],
                          "runs")
        msg = (f"{c.how}: makes all {_plural(n_runs, 'run')} pass but leaves line{'s' if len(lost) > 1 else ''} "
               f"{where} unreached (not verified)")
        return finish([Hint(path, function, c.line - 1, msg, c.text, RUNS_CONFIDENCE, "", evidence="runs")], "runs")
    if crashing:
        c, why = crashing[0]
        say(f"\nReplacing line {c.line} with `{_q(c.text.strip(), 60)}` ({c.how}) makes all "
            f"{_plural(n_runs, 'run')} pass, but {why}: the tests do not confirm it.")
        msg = (f"{c.how}: makes all {_plural(n_runs, 'run')} pass but does not finish on inputs derived from "
               "them where the original returned (not verified)")
        return finish([Hint(path, function, c.line - 1, msg, c.text, RUNS_CONFIDENCE, "", evidence="runs")], "runs")
    top = rep.ranked_final[0] if rep.ranked_final else top
    part = mut.get(top.line, 0.0)
    say(f"\nNo one-line fix among {done} candidates made every failing run pass; the most suspicious line is "
        f"{top.line}" + (f" (a change there fixes {part:.0%} of the failing runs)" if part > 0 else "") + ".")
    fix = mhint.fix if mhint is not None and mhint.line + 1 == top.line else None
    msg = f"runs in {top.failing} of {len(fails)} failing runs and {top.passing} of {P} passing (no verified fix)"
    conf = RUNS_CONFIDENCE * (0.5 + 0.5 * max(top.ochiai, part))
    return finish([Hint(path, function, top.line - 1, msg, fix, round(conf, 3), "", evidence="runs")], "runs")


def _call_text(function: str, args_text: str) -> str:
    """``f(1, [2])`` from the probe's ``([1, [2]], {})``."""
    import ast as _ast

    try:
        pos, kw = _ast.literal_eval(args_text)
        inner = ", ".join([*(repr(a) for a in pos), *(f"{k}={v!r}" for k, v in kw.items())])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        inner = args_text
    return f"{function.split('.')[-1]}({inner})"


def _stuck(outcome: Sequence[str]) -> bool:
    """The call did not finish: a timeout or unbounded recursion (an exception such as
    ``ZeroDivisionError`` may be the right answer on a derived input; not finishing is not)."""
    return outcome[0] == "timeout" or tuple(outcome[:2]) == ("raise", "RecursionError")


def _show(outcome: Sequence[str]) -> str:
    if outcome[0] == "ok":
        return f"returns {_q(outcome[1], 30)}"
    if outcome[0] == "raise":
        return f"raises {outcome[1]}"
    return "does not finish" if outcome[0] == "timeout" else outcome[0]


def _differential(scored: list[tuple[repair.Candidate, float]], outcomes: dict[int, dict[str, tuple[str, ...]]],
                  base_by_input: dict[str, tuple[str, ...]], function: str,
                  ) -> tuple[list[tuple[repair.Candidate, float]], bool, str, str] | None:
    """Differential testing of the verified fixes on the inputs derived from the evidence.

    Fixes that behave alike on every derived input are one answer. When they disagree, the
    evidence cannot say which is right — unless exactly one behaviour keeps everything the
    original returned and changes only where it raised or hung (the others change results the
    runs did not ask to change): that one stays verified, ranked first. Otherwise the best-ranked
    fix is only plausible. Fixes the probe did not reach take no part. Returns (fixes reordered,
    plausible, an input they disagree on, a sentence for the reasoning), or None when nothing
    was probed."""
    probed = [outcomes[id(c)] for c, _ in scored if id(c) in outcomes]
    # the inputs every probed fix was called on, where the original answered the same twice
    inputs = [k for k, b in base_by_input.items() if b[0] in ("ok", "raise", "timeout") and all(k in o for o in probed)]
    if not inputs:
        return None
    base = [base_by_input[k] for k in inputs]
    usable = list(range(len(inputs)))
    groups: dict[tuple, list[tuple[repair.Candidate, float]]] = {}
    for c, sc in scored:
        o = outcomes.get(id(c))
        if o is not None:
            groups.setdefault(tuple(o[k] for k in inputs), []).append((c, sc))
    if len(groups) <= 1:
        return scored, False, "", ""

    def changed(key: tuple) -> int:
        return sum(1 for j, out in zip(usable, key) if base[j][0] == "ok" and out != base[j])

    keepers = [k for k in groups if changed(k) == 0]
    if len(keepers) == 1:
        first = groups[keepers[0]]
        rest = [x for x in scored if all(x[0] is not y[0] for y in first)]
        n_other = sum(len(v) for k, v in groups.items() if k != keepers[0])
        note = (f"{_plural(n_other, 'other fix')} also make{'s' if n_other == 1 else ''} every run pass but "
                f"change what the original returns on inputs derived from the runs; "
                f"`{_q(first[0][0].text.strip(), 50)}` changes only the "
                f"{_plural(sum(1 for j in usable if base[j][0] != 'ok'), 'input')} where the original raised or "
                "did not finish.")
        return first + rest, False, "", note
    # an input on which the best-ranked probed fix and a rival disagree
    lead = next(c for c, _ in scored if any(c is y for v in groups.values() for y, _ in v))
    top = next(k for k, v in groups.items() if any(c is lead for c, _ in v))
    other = next(k for k in groups if k != top)
    example = ""
    for pos, (a, b) in enumerate(zip(top, other)):
        if a != b:
            rival = groups[other][0][0]
            example = (f"on `{_q(_call_text(function, inputs[usable[pos]]), 60)}` "
                       f"`{_q(lead.text.strip(), 40)}` {_show(a)} and `{_q(rival.text.strip(), 40)}` {_show(b)}")
            break
    n = sum(len(v) for v in groups.values())
    note = (f"{_plural(n, 'fix')} make every run pass, but they behave {len(groups)} different ways on "
            f"{_plural(len(usable), 'input')} derived from the runs ({example}): the evidence cannot tell which "
            "is right.")
    return scored, True, example, note


def debug_stream(engine: Any, path: str, source: str, functions: Sequence[str] = (),
                 opts: DebugOptions | None = None) -> Iterator[Event]:
    """Events for the faces: per function, reasoning events citing the evidence, then one
    ``answer`` event and a ``done`` event with the :class:`DebugResult`. A function whose
    evidence cannot run is reported and the next one goes on."""
    import queue
    import threading

    opts = opts or DebugOptions()
    try:
        tgt = evmod.prepare(path, source, functions, tests=opts.tests, repo_tests=opts.repo_tests,
                            doctests=opts.doctests)
    except (evmod.EvidenceError, OSError) as e:
        yield Event("error", str(e))
        return
    names = list(functions) or list(tgt.examples)
    for name in names:
        q: queue.Queue = queue.Queue()
        box: dict[str, Any] = {}
        th = threading.Thread(target=_work, args=(engine, tgt, name, path, opts, q, box), daemon=True)
        th.start()
        while True:
            item = q.get()
            if item is None:
                break
            yield Event("reasoning", item)
        th.join()
        if "err" in box:
            e = box["err"]
            yield Event("error", f"{name}: {type(e).__name__}: {e}")
            continue
        result, _rep = box["out"]
        yield Event("answer", "; ".join(f"line {h.line + 1}: {h.message}" for h in result.hints) or "no issue")
        yield Event("done", result=result)


def _work(engine: Any, tgt: evmod.Target, name: str, path: str, opts: DebugOptions, q: Any, box: dict) -> None:
    try:
        box["out"] = debug_function(engine, tgt, name, path, opts, emit=q.put)
    except Exception as e:  # noqa: BLE001 - report it and go on with the next function
        box["err"] = e
    finally:
        q.put(None)
