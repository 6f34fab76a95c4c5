"""Debugging from evidence (assistant/evidence.py, localize.py, repair.py, debugging.py):
run the examples and tests in the sandbox, localise, repair, verify, cite the evidence."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from assistant_fakes import ScriptedBackend

from assistant import debugging, evidence, localize, repair
from assistant.engine import Engine

BUGGY = textwrap.dedent('''\
    def count_below(items, limit):
        """How many items are at most ``limit``.

        >>> count_below([1, 2, 3], 2)
        2
        >>> count_below([5], 1)
        0
        >>> count_below([], 3)
        0
        >>> count_below([3, 3], 3)
        2
        """
        n = 0
        for x in items:
            if x < limit:
                n += 1
        return n


    def double(x):
        """Twice ``x``.

        >>> double(4)
        8
        """
        return x * 2
    ''')

FAST = debugging.DebugOptions(budget_s=60, per_run_timeout=2.0, use_model=False)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _events(engine, path, functions=(), opts=FAST):
    src = Path(path).read_text()
    return list(debugging.debug_stream(engine, str(path), src, functions, opts))


def test_doctests_localise_and_verify_a_fix_citing_the_examples(tmp_path):
    p = _write(tmp_path, "mod.py", BUGGY)
    events = _events(None, p, ["count_below"])
    kinds = [e.kind for e in events]
    assert kinds.index("reasoning") < kinds.index("answer") < kinds.index("done")
    result = events[-1].result
    (h,) = result.hints
    assert h.evidence == "verified" and h.confidence >= 0.9
    assert h.line + 1 == 15 and h.fix == "        if x <= limit:"
    text = result.reasoning
    # the reasoning cites a failing example with what it returned and what the docstring expects
    assert "`count_below([1, 2, 3], 2)` returned 1, the docstring expects 2" in text
    assert "makes all 4 runs pass" in text and "Line 15" in text


def test_a_clean_function_with_passing_examples_gets_no_hint(tmp_path):
    p = _write(tmp_path, "mod.py", BUGGY)
    result = _events(None, p, ["double"])[-1].result
    assert result.hints == []
    assert "All 1 run pass" in result.reasoning


def test_ochiai_ranks_the_line_only_failing_runs_execute_first():
    ev = evidence.Evidence("f", 1, 6, runs=[
        evidence.Run("a", "pytest", "failed", lines=frozenset({2, 3, 5})),
        evidence.Run("b", "pytest", "failed", lines=frozenset({2, 3, 5})),
        evidence.Run("c", "pytest", "passed", lines=frozenset({2, 3, 4})),
        evidence.Run("d", "pytest", "passed", lines=frozenset({2, 4})),
    ])
    ranked = localize.rank(ev, [2, 3, 4, 5])
    assert ranked[0].line == 5 and ranked[0].ochiai == pytest.approx(1.0)
    assert (ranked[0].failing, ranked[0].passing) == (2, 0)
    och = localize.ochiai(ev, [3])[3][0]
    assert och == pytest.approx(2 / (2 * 3) ** 0.5)
    # lines 2 and 6 run in exactly the same runs: Ochiai ties them (credit 1/2 each); the
    # model's surprisal breaks the tie
    ev.runs = [evidence.Run(r.id, r.kind, r.outcome, lines=r.lines | ({6} if 2 in r.lines else set()))
               for r in ev.runs]
    assert localize.top1_credit(localize.rank(ev, [2, 6], mode="ochiai"), {6}) == pytest.approx(0.5)
    tied = localize.rank(ev, [2, 6], surprisal={2: 0.1, 6: 5.0})
    assert tied[0].line == 6 and localize.top1_credit(tied, {6}) == 1.0


def test_mutations_cover_the_usual_one_line_slips():
    src = "def f(a, b, items):\n    if a < b:\n        return items[len(items) - 1]\n    return g(a, b)\n"
    texts = {c.text.strip() for c in repair.candidates_for(src, 2)}
    assert {"if a <= b:", "if a > b:", "if b < a:", "if not (a < b):"} <= texts | {"if b < a:"}
    assert "if a <= b:" in texts and "if a < a:" in texts  # comparison, variable swap
    texts3 = {c.text.strip() for c in repair.candidates_for(src, 3)}
    assert "return items[len(items)]" in texts3 and "return items[len(items) - 2]" in texts3
    texts4 = {c.text.strip() for c in repair.candidates_for(src, 4)}
    assert "return g(b, a)" in texts4
    # every candidate parses and differs from the line
    for c in repair.candidates_for(src, 3):
        assert repair.parses(c.apply(src)) and c.text.strip() != "return items[len(items) - 1]"


def test_repository_tests_are_found_by_name_and_run_with_coverage(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "calc.py").write_text("def add(a, b):\n    return a - b\n\n\ndef neg(a):\n    return -a\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_calc.py").write_text(
        "from pkg.calc import add, neg\n\n"
        "def test_add():\n    assert add(2, 3) == 5\n\n"
        "def test_add_zero():\n    assert add(0, 0) == 0\n\n"
        "def test_neg():\n    assert neg(2) == -2\n")
    tgt = evidence.prepare(pkg / "calc.py")
    assert tgt.tests["add"] == ["tests/test_calc.py::test_add", "tests/test_calc.py::test_add_zero"]
    assert tgt.tests["neg"] == ["tests/test_calc.py::test_neg"]
    ev = evidence.gather(tgt, "add")
    assert [(r.id.split("::")[1], r.outcome) for r in ev.runs] == [("test_add", "failed"), ("test_add_zero", "passed")]
    assert all(2 in r.lines for r in ev.runs)
    assert "assert -1 == 5" in ev.failing[0].message
    res, rep = debugging.debug_function(None, tgt, "add", str(pkg / "calc.py"), FAST)
    assert res.hints[0].evidence == "verified" and res.hints[0].fix.strip() == "return a + b"


def test_user_tests_option_and_a_missing_path(tmp_path):
    p = _write(tmp_path, "m.py", "def inc(x):\n    return x + 2\n")
    t = _write(tmp_path, "check_m.py", "from m import inc\n\ndef test_inc():\n    assert inc(1) == 2\n    assert inc(5) == 6\n")
    opts = debugging.DebugOptions(tests=[str(t)], use_model=False, budget_s=60)
    result = _events(None, p, ["inc"], opts)[-1].result
    assert result.hints[0].evidence == "verified" and result.hints[0].fix.strip() == "return x + 1"
    bad = debugging.DebugOptions(tests=[str(tmp_path / "nope.py")], use_model=False)
    ev = _events(None, p, ["inc"], bad)
    assert ev[-1].kind == "error" and "no such file" in ev[-1].text


BAD = textwrap.dedent('''\
    import os, socket, sys


    def spin(n):
        """
        >>> spin(1)
        1
        """
        while n:
            pass
        return n


    def shout(n):
        """
        >>> shout(1)
        1
        """
        sys.stdout.write("x" * (40 * 1024 * 1024))
        return n


    def spawn(n):
        """
        >>> spawn(1)
        1
        """
        os.fork()
        return n


    def fetch(n):
        """
        >>> fetch(1)
        1
        """
        socket.create_connection(("127.0.0.1", 9), timeout=2).recv(10)
        return n


    def scribble(n):
        """
        >>> scribble(1)
        1
        """
        open("/tmp/moecoder-debug-escape.txt", "w").write("x")
        return n


    def fine(n):
        """
        >>> fine(2)
        3
        """
        return n + 1
    ''')


def test_bad_code_is_contained_and_reported_and_the_next_function_goes_on(tmp_path):
    p = _write(tmp_path, "bad.py", BAD)
    opts = debugging.DebugOptions(use_model=False, budget_s=20, per_run_timeout=1.0, top_lines=1, chunk=5,
                                  max_verified=1)
    events = _events(None, p, ["spin", "shout", "spawn", "fetch", "scribble", "fine"], opts)
    done = [e.result for e in events if e.kind == "done"]
    assert len(done) == 6  # every function got an answer, none stopped the review
    why = [r.reasoning for r in done]
    assert "did not finish" in why[0]
    assert any(s in why[1] for s in ("stopped the process", "did not finish", "returned"))
    assert "os.fork is not allowed" in why[2]
    assert "socket" in why[3] and "not allowed" in why[3]
    assert "write outside the sandbox" in why[4]
    assert not Path("/tmp/moecoder-debug-escape.txt").exists()
    assert done[5].hints == [] and "All 1 run pass" in why[5]


def test_tests_that_fail_to_import_are_reported(tmp_path):
    (tmp_path / "setup.py").write_text("")
    _write(tmp_path, "lib.py", "def one():\n    return 1\n")
    _write(tmp_path, "test_lib.py", "from lib import one\nimport no_such_module_xyz\n\ndef test_one():\n    assert one() == 1\n")
    tgt = evidence.prepare(tmp_path / "lib.py")
    ev = evidence.gather(tgt, "one")
    assert ev.runs == [] and any("failed to import" in p and "no_such_module_xyz" in p for p in ev.problems)
    res, _ = debugging.debug_function(None, tgt, "one", None, FAST)
    assert "failed to import" in res.reasoning and res.hints == []


def _debug_script(task, code):
    if task == "debug":
        return "Line 2 looks odd.", "line 2: the sum subtracts\nfix: return a + b"
    return "", "return a + b"


def test_without_failing_runs_the_hint_is_model_only_and_lower(tmp_path, tiny_tokenizer):
    engine = Engine.from_loaded(backend=ScriptedBackend(tiny_tokenizer, _debug_script, context_length=4096))
    p = _write(tmp_path, "m.py", "def add(a, b):\n    return a - b\n")
    opts = debugging.DebugOptions(use_model=True, doctests=False, repo_tests=False)
    try:
        result = _events(engine, p, ["add"], opts)[-1].result
        (h,) = result.hints
        assert h.evidence == "model" and h.message.startswith("[model only]")
        assert "Nothing to run" in result.reasoning and "model-only" in result.reasoning
        # with failing evidence the model's fix is checked by running it
        t = _write(tmp_path, "test_m.py", "from m import add\n\ndef test_add():\n    assert add(1, 1) == 2\n")
        opts2 = debugging.DebugOptions(use_model=True, tests=[str(t)], repo_tests=False)
        r2 = _events(engine, p, ["add"], opts2)[-1].result
        assert r2.hints[0].evidence == "verified" and r2.hints[0].confidence > h.confidence
        assert r2.hints[0].fix.strip() == "return a + b"
    finally:
        engine.close()


def test_review_run_replaces_model_hints_with_evidence(tmp_path, tiny_tokenizer, capsys):
    import json

    from assistant import review

    (tmp_path / "setup.py").write_text("")
    _write(tmp_path, "mod.py", BUGGY)
    engine = Engine.from_loaded(backend=ScriptedBackend(
        tiny_tokenizer, lambda task, code: ("Line 1 is odd.", "line 1: odd\nfix: pass") if task == "debug"
        else ("", "Summary."), context_length=4096))
    try:
        code = review.main([str(tmp_path / "mod.py"), "--format", "json", "--min-confidence", "0",
                            "--no-docstrings"], engine=engine)
        plain = json.loads(capsys.readouterr().out)["findings"]
        assert code == 1 and {f["line"] for f in plain} == {1, 20}  # the model's guesses, no code ran
        code = review.main([str(tmp_path / "mod.py"), "--format", "json", "--no-docstrings", "--run"], engine=engine)
        found = json.loads(capsys.readouterr().out)["findings"]
    finally:
        engine.close()
    # count_below: the verified fix; double: its example passes, the model's hint drops below the threshold
    assert code == 1 and [(f["function"], f["line"], f["fix"].strip()) for f in found] == [
        ("count_below", 15, "if x <= limit:")]
    assert "verified" in found[0]["message"] and "returned 1, the docstring expects 2" in found[0]["reasoning"]


def test_a_module_in_a_package_with_circular_imports_is_checked_through_the_import_system(tmp_path):
    # loading pk/core.py on its own would fail: pk/__init__ -> pk.user -> pk.core.add (half-built)
    (tmp_path / "setup.py").write_text("")
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "__init__.py").write_text("from pk import user\n")
    (pk / "user.py").write_text("from pk import core\n\nADD = core.add\n")
    (pk / "core.py").write_text("import pk\n\n\ndef add(a, b):\n    return a - b\n")
    (tmp_path / "test_pk.py").write_text("from pk.core import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    tgt = evidence.prepare(pk / "core.py")
    res, rep = debugging.debug_function(None, tgt, "add", None, FAST)
    assert not rep.evidence.problems
    assert res.hints[0].evidence == "verified" and res.hints[0].fix.strip() == "return a + b"


LONG_STATEMENT = textwrap.dedent('''\
    def weighted(pairs, scale):
        """Sum of ``value * weight`` over the pairs, times ``scale``.

        >>> weighted([(2, 3), (4, 5)], 1)
        26
        >>> weighted([(1, 1)], 2)
        2
        >>> weighted([], 3)
        0
        """
        total = sum(
            value + weight
            for value, weight in pairs
        )
        return total * scale
    ''')


def test_a_statement_over_several_lines_is_localised_and_repaired_on_its_own_line(tmp_path):
    src = LONG_STATEMENT
    owner = localize.physical_lines(src, 1, 15)
    # the later lines of ``total = sum(...)`` belong to its first line; ``)`` alone is no line
    assert owner == {11: 11, 12: 11, 13: 11, 15: 15}
    assert repair._tokens("total = sum(") is not None  # an unclosed bracket: the tokens read so far
    # a later line shares its statement's runs, ranks just below the lines tied with it, and
    # is lifted by a repair
    ev = evidence.Evidence("weighted", 1, 15, runs=[
        evidence.Run("a", "doctest", "failed", lines=frozenset({11, 15})),
        evidence.Run("b", "doctest", "passed", lines=frozenset({11, 15})),
    ])
    ranked = localize.rank(ev, list(owner), owner=owner)
    assert [s.line for s in ranked[:3]] == [11, 15, 12] and ranked[2].ochiai == ranked[0].ochiai
    assert localize.top1_credit(ranked, {11}) == 0.5  # tied with line 15, not with its own line 12
    assert localize.rank(ev, list(owner), owner=owner, mutation={12: 1.0})[0].line == 12
    # end to end: the fix is verified on line 12, not on the statement's first line
    p = _write(tmp_path, "w.py", src)
    (h,) = _events(None, p, ["weighted"])[-1].result.hints
    assert h.evidence == "verified" and h.line + 1 == 12 and h.fix.strip() == "value * weight"


def test_swapped_indices_and_fragments_get_candidates():
    src = "def f(d, n):\n    return min(\n        d[1, 2],\n        d[n, 0] + d[0, n]\n    )\n"
    texts = {c.text.strip() for c in repair.candidates_for(src, 4, fragment=True)}
    assert "d[0, n] + d[0, n]" in texts or "d[n, 0] + d[n, 0]" in texts  # a name swapped in
    assert "d[0, n] + d[n, 0]" in texts and "d[n, 0] + d[n, 0]" in texts  # swapped indices / operands
    assert "pass" not in texts  # a later line of a statement is never dropped on its own
    for c in repair.candidates_for(src, 4, fragment=True):
        assert repair.parses(c.apply(src))


CUT_OUT = textwrap.dedent('''\
    def index_of(arr, x):
        """Where ``x`` is in the sorted ``arr``, or -1.

        >>> index_of([1, 2, 3, 5, 8], 3)
        2
        >>> index_of([1, 2, 3, 5, 8], 1)
        0
        >>> index_of([1, 2, 3], 9)
        -1
        """
        def search(start, end):
            if start == end:
                return -1
            mid = start + (end - start) // 2
            if x < arr[mid]:
                return search(start, mid)
            elif x > arr[mid]:
                return search(mid, end)
            else:
                return mid
        return search(0, len(arr))
    ''')


def test_a_fix_that_leaves_reached_code_unreached_is_not_verified(tmp_path, monkeypatch):
    p = _write(tmp_path, "bs.py", CUT_OUT)
    src = p.read_text()
    tgt = evidence.prepare(p, src, ["index_of"])
    # ``x != arr[mid]`` makes every example pass (it searches left only), but then no example
    # reaches line 18 any more: not verified; the search goes on to the real fix
    opts = debugging.DebugOptions(budget_s=60, per_run_timeout=2.0, use_model=False, keep_going=True)
    res, rep = debugging.debug_function(None, tgt, "index_of", str(p), opts)
    cut = {c.text.strip(): lost for c, lost in rep.suspicious}
    assert cut.get("if x != arr[mid]:") == [18]
    assert all(c.text.strip() != "if x != arr[mid]:" for c, _ in rep.verified)
    (h,) = res.hints
    assert h.evidence == "verified" and h.fix.strip() == "return search(mid + 1, end)"
    # with only the cutting fix on offer, it is not verified, and the line it cuts out (which the
    # failing run executed) is named as the likely fault, without a fix
    monkeypatch.setattr(repair, "candidates_for", lambda source, line, *a, **k: [
        repair.Candidate(15, "        if x != arr[mid]:", "`<` -> `!=`", "mutation", 0)] if line == 15 else [])
    res1, rep1 = debugging.debug_function(None, tgt, "index_of", str(p), FAST)
    (h1,) = res1.hints
    assert not rep1.verified and h1.evidence == "runs" and h1.line + 1 == 18 and h1.fix is None
    assert h1.confidence < debugging.VERIFIED_CONFIDENCE and "no verified fix" in h1.message
    assert "no run reaches line 18 any more" in res1.reasoning and "line 18 is the likely fault" in res1.reasoning


def test_with_nothing_verified_on_the_top_lines_the_search_goes_down_the_ranking(tmp_path):
    src = textwrap.dedent('''\
        def area(w, h):
            """
            >>> area(2, 3)
            6
            >>> area(1, 1)
            1
            """
            a = w
            b = h
            return a + b
        ''')
    p = _write(tmp_path, "area.py", src)
    tgt = evidence.prepare(p, src, ["area"])
    narrow = debugging.DebugOptions(budget_s=60, per_run_timeout=2.0, use_model=False, top_lines=1, widen=False)
    res, _ = debugging.debug_function(None, tgt, "area", str(p), narrow)
    assert res.hints[0].evidence == "runs"  # every line ties; the first one has no fix
    wide = debugging.DebugOptions(budget_s=60, per_run_timeout=2.0, use_model=False, top_lines=1)
    res, rep = debugging.debug_function(None, tgt, "area", str(p), wide)
    (h,) = res.hints
    assert h.evidence == "verified" and h.line + 1 == 10 and h.fix.strip() == "return a * b"
    assert "the next lines down the ranking" in res.reasoning


def test_a_fix_that_makes_two_branches_identical_is_not_verified(tmp_path, monkeypatch):
    p = _write(tmp_path, "bs.py", CUT_OUT)
    src = p.read_text()
    assert repair.makes_branches_identical(src, src.replace("search(mid, end)", "search(start, mid)"), 1, 21)
    assert not repair.makes_branches_identical(src, src.replace("search(mid, end)", "search(mid + 1, end)"), 1, 21)
    # ``return search(start, mid)`` on line 18 passes every example (a search to the right
    # never finds anything), but both branches then do the same: not verified
    monkeypatch.setattr(repair, "candidates_for", lambda source, line, *a, **k: [
        repair.Candidate(18, "            return search(start, mid)", "the model's completion", "model", -1),
        repair.Candidate(18, "            return search(mid + 1, end)", "`mid` -> `mid + 1`", "mutation", 2),
    ] if line == 18 else [])
    opts = debugging.DebugOptions(budget_s=60, per_run_timeout=2.0, use_model=False, keep_going=True)
    res, rep = debugging.debug_function(None, evidence.prepare(p, src, ["index_of"]), "index_of", str(p), opts)
    assert [c.text.strip() for c, _ in rep.suspicious] == ["return search(start, mid)"]
    (h,) = res.hints
    assert h.evidence == "verified" and h.fix.strip() == "return search(mid + 1, end)"
    monkeypatch.setattr(repair, "candidates_for", lambda source, line, *a, **k: [
        repair.Candidate(18, "            return search(start, mid)", "the model's completion", "model", -1),
    ] if line == 18 else [])
    res, rep = debugging.debug_function(None, evidence.prepare(p, src, ["index_of"]), "index_of", str(p), FAST)
    (h,) = res.hints
    assert not rep.verified and h.evidence == "runs" and h.line + 1 == 18 and "identical" in h.message
    assert "two branches of a condition do the same thing" in res.reasoning


SEVEN = CUT_OUT.replace('''\
    >>> index_of([1, 2, 3, 5, 8], 3)
    2
    >>> index_of([1, 2, 3, 5, 8], 1)
    0
    >>> index_of([1, 2, 3], 9)
    -1''', '''\
    >>> index_of([1, 2, 3, 4, 6, 7, 8], 4)
    3
    >>> index_of([3, 5, 6, 7, 8, 9, 12], 0)
    -1
    >>> index_of([24, 26, 28, 50, 59], 101)
    -1''')


def test_a_fix_that_does_not_finish_on_inputs_derived_from_the_runs_is_not_verified(tmp_path, monkeypatch):
    assert SEVEN != CUT_OUT
    p = _write(tmp_path, "bs.py", SEVEN)
    src = p.read_text()
    tgt = evidence.prepare(p, src, ["index_of"])
    # ``search(end, mid)`` passes the three examples, but on inputs derived from them (the
    # examples' own lists and values, changed a little, still sorted) it recurses without end
    # where the original returned: not verified; the real fix is
    monkeypatch.setattr(repair, "candidates_for", lambda source, line, *a, **k: [
        repair.Candidate(18, "            return search(end, mid)", "the model's fix", "model", -1),
        repair.Candidate(18, "            return search(mid + 1, end)", "`mid` -> `mid + 1`", "mutation", 2),
    ] if line == 18 else [])
    res, rep = debugging.debug_function(None, tgt, "index_of", str(p), FAST)
    assert [c.text.strip() for c, _ in rep.crashing] == ["return search(end, mid)"]
    assert "recurses without end where the original returned" in rep.crashing[0][1] and rep.probe_inputs > 10
    (h,) = res.hints
    assert h.evidence == "verified" and h.fix.strip() == "return search(mid + 1, end)"
    # alone, it is reported with what it does, not verified
    monkeypatch.setattr(repair, "candidates_for", lambda source, line, *a, **k: [
        repair.Candidate(18, "            return search(end, mid)", "the model's fix", "model", -1)] if line == 18 else [])
    res, rep = debugging.debug_function(None, tgt, "index_of", str(p), FAST)
    (h,) = res.hints
    assert not rep.verified and h.evidence == "runs" and h.confidence < debugging.VERIFIED_CONFIDENCE
    assert "does not finish on inputs derived from them" in h.message and "the tests do not confirm it" in res.reasoning


def test_fixes_that_pass_every_run_but_disagree_elsewhere_are_only_plausible(tmp_path, monkeypatch):
    p = _write(tmp_path, "mod.py", BUGGY)
    src = p.read_text()
    tgt = evidence.prepare(p, src, ["count_below"])

    def offer(*texts):
        monkeypatch.setattr(repair, "candidates_for", lambda source, line, *a, **k: [
            repair.Candidate(15, "        " + t, f"fix {i}", "mutation", i) for i, t in enumerate(texts)]
            if line == 15 else [])

    # two spellings of one behaviour: they agree on every derived input, verified
    offer("if x <= limit:", "if x < limit + 1:")
    res, rep = debugging.debug_function(None, tgt, "count_below", str(p), FAST)
    assert len(rep.verified) == 2 and res.hints[0].evidence == "verified" and not rep.plausible
    # ``x == 2`` also passes the four examples (2 is the first example's limit), but on
    # ``count_below([1, 2, 3], 1)`` the two fixes disagree: the examples cannot tell which is right
    offer("if x <= limit or x == 2:", "if x <= limit:")
    res, rep = debugging.debug_function(None, tgt, "count_below", str(p), FAST)
    (h,) = res.hints
    assert len(rep.verified) == 2 and rep.plausible
    assert h.evidence == "plausible" and h.confidence == debugging.PLAUSIBLE_CONFIDENCE < debugging.VERIFIED_CONFIDENCE
    assert "plausible, not verified" in h.message and "the evidence cannot tell which is right" in res.reasoning
    assert "count_below(" in rep.disagreement and rep.disagreement in res.reasoning


def test_the_fix_that_changes_only_what_the_original_got_stuck_on_stays_verified(tmp_path, monkeypatch):
    p = _write(tmp_path, "bs.py", CUT_OUT)
    src = p.read_text()
    tgt = evidence.prepare(p, src, ["index_of"])
    # both pass the examples; ``search(mid, end - 1)`` also changes answers the original gave
    # (the last item is never found), ``search(mid + 1, end)`` only where it recursed forever
    monkeypatch.setattr(repair, "candidates_for", lambda source, line, *a, **k: [
        repair.Candidate(18, "            return search(mid, end - 1)", "the model's fix", "model", -1),
        repair.Candidate(18, "            return search(mid + 1, end)", "`mid` -> `mid + 1`", "mutation", 2),
    ] if line == 18 else [])
    res, rep = debugging.debug_function(None, tgt, "index_of", str(p), FAST)
    (h,) = res.hints
    assert not rep.plausible and h.evidence == "verified" and h.fix.strip() == "return search(mid + 1, end)"
    assert "changes only the" in res.reasoning and "where the original raised or did not finish" in res.reasoning


def test_inputs_derived_from_the_recorded_calls_keep_what_held_in_all_of_them():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_runner", evidence.RUNNER)
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    calls = [([[1, 3, 5, 7], 3], {}), ([[2, 4, 9], 9], {}), ([[0, 8], 1], {})]
    got = runner.derive_inputs(calls, limit=60)
    assert len(got) == 60 and all(kw == {} for _, kw in got)
    for (arr, x), _ in got:
        assert isinstance(arr, list) and arr == sorted(arr) and len(set(arr)) == len(arr) and arr  # sorted, distinct, non-empty
        assert isinstance(x, int) and x >= 0
    assert all(list(c) not in [list(g) for g in got] for c in calls)  # new inputs only
    # an argument that indexes a sequence in every call stays inside it
    idx = runner.derive_inputs([([[5, 6, 7], 0], {}), ([[1, 2], 1], {})], limit=40)
    assert idx and all(0 <= i < len(a) for (a, i), _ in idx)
