"""Evidence for debugging: run what can run for a function and record who passed, who failed
and which lines each run executed.

What runs: the doctest examples in the function's docstring (``>>>``), the repository's pytest
tests that call the function (test functions whose body names it, in test files that name the
module), and tests the user names (``--tests PATH`` or ``PATH::NODEID``). Everything runs in
:mod:`assistant.sandbox` (a subprocess with resource limits, a wall-clock timeout, no network,
no processes, writes confined to a temporary copy) through ``_evidence_runner.py``, which
records each run's outcome and its line coverage (coverage.py) of the target file, one JSON
line per run as it goes. A run that loops is stopped by a per-run timer and recorded as a
timeout; a run that kills the process (a huge output, a crash) is recorded as "crashed" and
the rest run in a fresh process; tests that fail to import are reported, not counted.

The same machinery checks candidate fixes: :func:`check_candidates` runs the evidence on
each candidate version of the file (one process for many candidates, the failing runs first,
stopping a candidate at its first failure).
"""

from __future__ import annotations

import ast
import doctest
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from assistant import sandbox
from assistant.files import read_text

RUNNER = Path(__file__).with_name("_evidence_runner.py")
RUNNER_NAME = "_moecoder_runner.py"
SPEC_NAME = "_moecoder_spec.json"
RESULTS_NAME = "_moecoder_results.jsonl"

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", "venv", "env", ".tox", ".nox",
             ".mypy_cache", ".pytest_cache", ".ruff_cache", "build", "dist", "site-packages", ".eggs"}
MAX_COPY_FILES = 3000
MAX_COPY_BYTES = 40_000_000
MAX_FILE_BYTES = 2_000_000


class EvidenceError(ValueError):
    """Bad input for the evidence (a --tests path that does not exist, ...): one line."""


@dataclass
class Run:
    """One doctest example or one pytest test, run once."""

    id: str
    kind: str  # "doctest" | "pytest"
    outcome: str  # "passed" | "failed" | "timeout" | "error" | "crashed"
    message: str = ""
    lines: frozenset[int] = frozenset()  # 1-based lines of the target file it executed
    source: str = ""  # doctest: the example's code
    want: str = ""  # doctest: the expected output
    got: str = ""  # doctest: what it printed/raised
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    def label(self) -> str:
        if self.kind == "doctest" and self.source:
            return f"`{self.source.splitlines()[0]}`"
        return f"`{self.id.split('/')[-1]}`"


@dataclass
class Evidence:
    """The runs for one function (those that executed it), and what went wrong around them."""

    function: str
    first_line: int  # 1-based lines of the function in the target file
    last_line: int
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # import errors, crashes, timeouts
    collected: int = 0  # runs asked for (examples + selected tests)
    seconds: float = 0.0

    @property
    def failing(self) -> list[Run]:
        return [r for r in self.runs if not r.passed]

    @property
    def passing(self) -> list[Run]:
        return [r for r in self.runs if r.passed]

    def summary(self) -> str:
        n, f = len(self.runs), len(self.failing)
        kinds = sorted({r.kind for r in self.runs})
        what = " and ".join({"doctest": "doctest examples", "pytest": "tests"}[k] for k in kinds) or "runs"
        return f"{f} of {n} {what} fail" if n else "nothing ran"


@dataclass
class Target:
    """What to copy into the sandbox and what to run there for one file."""

    files: dict[str, str | Path]  # sandbox-relative name -> content or a file to copy
    target: str  # sandbox-relative path of the file under test
    module: str  # its dotted module name
    source: str  # the file's text as it is
    examples: dict[str, list[dict]] = field(default_factory=dict)  # function -> doctest examples
    tests: dict[str, list[str]] = field(default_factory=dict)  # function -> pytest node ids
    pytest_args: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- collecting
def _function_node(tree: ast.AST, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    parts = qualname.split(".")

    def find(body: list[ast.stmt], i: int):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == parts[i]:
                if i == len(parts) - 1:
                    return node if not isinstance(node, ast.ClassDef) else None
                return find(node.body, i + 1)
        return None

    return find(getattr(tree, "body", []), 0)


def function_span(source: str, qualname: str) -> tuple[int, int] | None:
    """1-based (first, last) lines of a function (decorators excluded), or None."""
    try:
        node = _function_node(ast.parse(source), qualname)
    except SyntaxError:
        return None
    if node is None:
        return None
    return node.lineno, node.end_lineno or node.lineno


def doctest_examples(source: str, qualname: str) -> list[dict]:
    """The ``>>>`` examples of a function's docstring, in order: ``{"id", "source", "want", "lineno"}``."""
    try:
        node = _function_node(ast.parse(source), qualname)
    except SyntaxError:
        return []
    if node is None:
        return []
    doc = ast.get_docstring(node, clean=True)
    if not doc or ">>>" not in doc:
        return []
    try:
        examples = doctest.DocTestParser().get_examples(doc)
    except ValueError:
        return []
    return [{"id": f"{qualname}:example{i + 1}", "source": ex.source, "want": ex.want, "lineno": ex.lineno}
            for i, ex in enumerate(examples)]


def project_root(path: Path) -> Path:
    """The directory to copy: the nearest ancestor with project markers, else the top package's parent."""
    d = path.resolve().parent
    top = d
    while (top / "__init__.py").is_file() and top.parent != top:
        top = top.parent
    probe = d
    for _ in range(6):
        if any((probe / m).exists() for m in ("pyproject.toml", "setup.py", "setup.cfg", ".git", "pytest.ini",
                                              "tox.ini")):
            return probe
        if probe.parent == probe:
            break
        probe = probe.parent
    return top


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                             and not d.endswith(".egg-info"))
        for f in sorted(filenames):
            yield Path(dirpath) / f


def project_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Files of the project to copy into the sandbox (Python files and small data), with notes
    when some were left out."""
    files: dict[str, Path] = {}
    total = 0
    notes: list[str] = []
    for p in _walk(root):
        if p.is_symlink() or not p.is_file():
            continue
        try:
            size = p.stat().st_size
        except OSError:
            continue
        if size > MAX_FILE_BYTES:
            continue
        if len(files) >= MAX_COPY_FILES or total + size > MAX_COPY_BYTES:
            notes.append(f"the project is large: only the first {len(files)} files were copied into the sandbox")
            break
        files[p.relative_to(root).as_posix()] = p
        total += size
    return files, notes


def is_test_file(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py") or name == "tests.py")


def _mentions(node: ast.AST, name: str) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id == name:
            return True
        if isinstance(n, ast.Attribute) and n.attr == name:
            return True
    return False


def _imports_module(tree: ast.AST, module: str) -> bool:
    """Whether the test module imports ``module`` (or a name from it) by its full or last name."""
    last = module.split(".")[-1]
    parent = module.rsplit(".", 1)[0] if "." in module else ""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == module or node.module.endswith("." + last) or node.module == last:
                return True
            if (node.module == parent or node.module.endswith("." + parent.split(".")[-1] if parent else False)) \
                    and any(a.name == last for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom) and node.level and any(a.name == last for a in node.names):
            return True
        elif isinstance(node, ast.Import):
            if any(a.name == module or a.name.endswith("." + last) or a.name == last for a in node.names):
                return True
    return False


def tests_calling(root: Path, files: Mapping[str, Path | str], module: str, func: str,
                  limit: int = 200) -> list[str]:
    """Node ids of the pytest tests (``test*`` functions, also in ``Test*`` classes) whose body
    names ``func`` (its last part), in test files that import the module."""
    short = func.split(".")[-1]
    mod_last = module.split(".")[-1]
    word = re.compile(rf"\b{re.escape(short)}\b")
    out: list[str] = []
    for rel in sorted(files):
        if not is_test_file(rel):
            continue
        src = files[rel]
        try:
            text = src if isinstance(src, str) else read_text(src, max_bytes=MAX_FILE_BYTES)
        except (OSError, ValueError):  # files.Unreadable is a ValueError
            continue
        if not word.search(text) or mod_last not in text:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:
            out.append(rel)  # let pytest report it (a test file that fails to import)
            continue
        if not _imports_module(tree, module):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                if _mentions(node, short):
                    out.append(f"{rel}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                for m in node.body:
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and m.name.startswith("test") \
                            and (_mentions(m, short) or _mentions(node, short)):
                        out.append(f"{rel}::{node.name}::{m.name}")
        if len(out) >= limit:
            break
    return out[:limit]


def module_name(rel: str) -> str:
    parts = rel[:-3].split("/") if rel.endswith(".py") else rel.split("/")
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(p for p in parts if p) or "target"


def prepare(path: str | Path, source: str | None = None, functions: Sequence[str] = (), *,
            tests: Sequence[str] = (), repo_tests: bool = True, doctests: bool = True) -> Target:
    """Collect the evidence for ``functions`` of the file ``path`` (the whole file's
    functions when empty): the project is copied as found by :func:`project_root`;
    ``tests`` are user test paths/node ids (relative to the current directory or the project)."""
    p = Path(path)
    if source is None:
        from assistant.files import Unreadable, read_text

        try:
            source = read_text(p)
        except Unreadable as e:
            raise EvidenceError(f"{path}: {e}") from None
    root = project_root(p)
    files, notes = project_files(root)
    try:
        rel = p.resolve().relative_to(root).as_posix()
    except ValueError:
        rel = p.name
    files[rel] = source  # the text under review (maybe unsaved)
    mod = module_name(rel)
    tgt = Target(files=dict(files), target=rel, module=mod, source=source, notes=notes)
    if not functions:
        from assistant import code as codemod

        functions = [f.qualname for f in codemod.functions(source)]
    user_ids: list[str] = []
    for t in tests:
        node = t.split("::", 1)
        tp = Path(node[0])
        cand = tp if tp.is_absolute() else (Path.cwd() / tp)
        if not cand.exists():
            cand = root / tp
        if not cand.exists():
            raise EvidenceError(f"--tests {t}: no such file")
        try:
            trel = cand.resolve().relative_to(root).as_posix()
        except ValueError:
            trel = f"_user_tests/{cand.name}"
            if cand.is_dir():
                for q in _walk(cand):
                    tgt.files[f"_user_tests/{cand.name}/{q.relative_to(cand).as_posix()}"] = q
            else:
                tgt.files[trel] = cand
        user_ids.append(trel + ("::" + node[1] if len(node) > 1 else ""))
    for fn in functions:
        tgt.examples[fn] = doctest_examples(source, fn) if doctests else []
        ids = tests_calling(root, files, mod, fn) if repo_tests else []
        tgt.tests[fn] = list(dict.fromkeys([*user_ids, *ids]))
    return tgt


# ----------------------------------------------------------------------------- running
def _parse_results(text: str) -> list[dict]:
    out = []
    for ln in text.splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def _to_run(rec: dict) -> Run:
    return Run(id=rec["test"], kind=rec.get("kind", "pytest"), outcome=rec.get("outcome", "error"),
               message=rec.get("message", ""), lines=frozenset(rec.get("lines", ())),
               source=rec.get("source", ""), want=rec.get("want", ""), got=rec.get("got", ""),
               seconds=rec.get("seconds", 0.0))


def _why_stopped(res: sandbox.SandboxResult) -> str:
    if res.timed_out:
        return "the run took too long and was stopped"
    if res.returncode < 0:
        import signal as _signal

        try:
            name = _signal.Signals(-res.returncode).name
        except ValueError:
            name = str(-res.returncode)
        why = {"SIGXFSZ": "it wrote too much output", "SIGXCPU": "it used too much CPU",
               "SIGKILL": "it was killed (memory or time)", "SIGSEGV": "it crashed"}.get(name, name)
        return f"the process was stopped ({name}: {why})"
    err = res.stderr.strip().splitlines()
    return f"the process exited with code {res.returncode}" + (f": {err[-1][:200]}" if err else "")


def execute(tgt: Target, *, examples: Sequence[dict] = (), pytest_ids: Sequence[str] = (),
            candidates: Sequence[tuple[str, str | None]] = (("base", None),), coverage: bool = True,
            per_run_timeout: float = 2.0, timeout: float = 60.0, stop_on_fail: bool = False,
            only_first: Sequence[str] = (), max_restarts: int = 3, swap: str | None = None,
            through_failing: bool = False,
            progress: Callable[[str], None] | None = None) -> tuple[dict[str, list[Run]], dict[str, bool], list[str]]:
    """Run the examples and tests once per candidate (``(id, source or None)``) in the sandbox.

    Returns (runs by candidate, finished-ok by candidate, problems). A process that dies is
    restarted after the run it died in (recorded as "crashed"), at most ``max_restarts`` times."""
    runs: dict[str, list[Run]] = {cid: [] for cid, _ in candidates}
    ends: dict[str, bool] = {}
    problems: list[str] = []
    todo = list(candidates)
    deselect: dict[str, list[str]] = {}
    t_end = time.monotonic() + timeout
    restarts = 0
    while todo:
        left = t_end - time.monotonic()
        if left <= 0.5:
            problems.append(f"time budget ({timeout:g}s) spent: {len(todo)} version(s) not run")
            break
        spec = {"target": tgt.target, "module": tgt.module, "examples": list(examples), "pytest": list(pytest_ids),
                "pytest_args": tgt.pytest_args, "candidates": [{"id": c, "source": s} for c, s in todo],
                "coverage": coverage, "per_run_timeout": per_run_timeout, "stop_on_fail": stop_on_fail,
                "only_first": list(only_first), "out": RESULTS_NAME,
                "deselect": deselect.get(todo[0][0], []), "swap": swap,
                "through_failing": through_failing}
        files = {**tgt.files, RUNNER_NAME: RUNNER, SPEC_NAME: json.dumps(spec)}
        res = sandbox.run("path", RUNNER_NAME, [SPEC_NAME], files=files, timeout=max(1.0, left),
                          collect=[RESULTS_NAME], max_file_mb=32, env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
        recs = _parse_results(res.files.get(RESULTS_NAME, ""))
        started: dict[str, str] = {}
        for rec in recs:
            cid = rec.get("candidate")
            if cid not in runs:
                continue
            kind = rec.get("kind")
            if kind == "end":
                ends[cid] = bool(rec.get("ok"))
                if progress:
                    progress(cid)
            elif kind == "start":
                started[cid] = rec["test"]
            elif kind == "collect":
                msg = f"{rec['test']}: {rec.get('message', '')}"
                if rec["test"] == "<pytest>":
                    err = [ln[1:].strip() for ln in res.stderr.splitlines() if ln.startswith("E ")]
                    head = next((ln for ln in res.stderr.splitlines() if ln.startswith("ImportError while")), "")
                    msg += ": " + "; ".join(x for x in (head.strip(), err[-1] if err else "") if x)[:300]
                if cid == candidates[0][0] and msg not in problems:
                    problems.append(msg)
                if rec["test"] == "<pytest>":
                    ends.setdefault(cid, False)
            else:
                started.pop(cid, None)
                runs[cid].append(_to_run(rec))
        todo = [(c, s) for c, s in todo if c not in ends]
        if not todo:
            break
        cid = todo[0][0]
        why = _why_stopped(res)
        crashed = started.get(cid)
        if crashed is not None:
            runs[cid].append(Run(id=crashed, kind="doctest" if any(e["id"] == crashed for e in examples) else "pytest",
                                 outcome="crashed", message=why))
        if cid == candidates[0][0]:
            problems.append(f"{crashed or 'the evidence'}: {why}")
        restarts += 1
        if res.timed_out or restarts > max_restarts or crashed is None or stop_on_fail:
            if stop_on_fail and crashed is not None and not res.timed_out and restarts <= max_restarts:
                ends[cid] = False  # this candidate failed; go on with the next ones
                todo = todo[1:]
                continue
            for c, _ in todo:
                ends.setdefault(c, False)
            if not res.timed_out and crashed is None:
                pass
            break
        deselect[cid] = [*deselect.get(cid, []), *(r.id for r in runs[cid])]
    return runs, ends, problems


def gather(tgt: Target, function: str, *, per_run_timeout: float = 2.0, timeout: float = 60.0,
           progress: Callable[[str], None] | None = None) -> Evidence:
    """Run the function's examples and tests once (with coverage) and keep the runs that
    executed the function (a run that never reaches it says nothing about its lines)."""
    span = function_span(tgt.source, function) or (1, len(tgt.source.splitlines()))
    ex, ids = tgt.examples.get(function, []), tgt.tests.get(function, [])
    ev = Evidence(function, span[0], span[1], collected=len(ex) + len(ids))
    if not ex and not ids:
        return ev
    t0 = time.monotonic()
    runs, _ends, problems = execute(tgt, examples=ex, pytest_ids=ids, per_run_timeout=per_run_timeout,
                                    timeout=timeout, progress=progress)
    ev.seconds = time.monotonic() - t0
    ev.problems = problems
    body = set(range(span[0], span[1] + 1))
    for r in runs["base"]:
        if r.kind == "doctest" or r.lines & body or (not r.passed and r.outcome in ("timeout", "crashed")
                                                      and not r.lines):
            ev.runs.append(r)
    return ev


def check_candidates(tgt: Target, ev: Evidence, candidates: Sequence[tuple[str, str]], *,
                     per_run_timeout: float = 2.0, timeout: float = 60.0, through_failing: bool = False,
                     progress: Callable[[str], None] | None = None) -> tuple[dict[str, bool], dict[str, list[Run]]]:
    """Run the evidence on each candidate source; a candidate is verified when every run that
    failed now passes and every run that passed still passes. ``through_failing``: a candidate
    runs all the failing runs (stopping at a timeout) before stopping at its first failure, so
    that how many failing runs it fixes is known (a localisation signal)."""
    if not candidates:
        return {}, {}
    ex = tgt.examples.get(ev.function, [])
    ids = [r.id for r in ev.runs if r.kind == "pytest"]
    fail_ids = [r.id for r in ev.failing if r.kind == "pytest"]
    runs, ends, _ = execute(tgt, examples=ex, pytest_ids=ids, candidates=candidates, coverage=False,
                            per_run_timeout=per_run_timeout, timeout=timeout, stop_on_fail=True,
                            only_first=fail_ids, progress=progress,
                            swap=None if "<" in ev.function else ev.function,
                            through_failing=through_failing and "<" not in ev.function)
    need = {r.id for r in ev.runs}
    ok: dict[str, bool] = {}
    for cid, _ in candidates:
        got = {r.id for r in runs.get(cid, []) if r.passed}
        ok[cid] = bool(ends.get(cid)) and need <= got
    return ok, runs


def coverage_of(tgt: Target, ev: Evidence, candidates: Sequence[tuple[str, str]], *,
                per_run_timeout: float = 2.0, timeout: float = 30.0) -> dict[str, frozenset[int] | None]:
    """The lines of the target file each candidate source executes over all of the evidence's
    runs (None: unknown — it did not finish, or a run did not pass under coverage, e.g. slower
    than its time limit when traced). For the check that a fix keeps the code the runs used to
    reach (a fix that leaves a line no run reaches any more deletes behaviour, not repairs it)."""
    if not candidates:
        return {}
    ex = tgt.examples.get(ev.function, [])
    ids = [r.id for r in ev.runs if r.kind == "pytest"]
    runs, ends, _ = execute(tgt, examples=ex, pytest_ids=ids, candidates=candidates, coverage=True,
                            per_run_timeout=per_run_timeout, timeout=timeout)
    out: dict[str, frozenset[int] | None] = {}
    for cid, _ in candidates:
        got = runs.get(cid, [])
        complete = cid in ends and len(got) == len(ev.runs) and all(r.passed for r in got)
        out[cid] = frozenset().union(*(r.lines for r in got)) if complete else None
    return out


@dataclass
class Probe:
    """The original and candidate versions called on inputs derived from the evidence's calls."""

    inputs: list[str]  # the derived inputs, as text
    results: dict[str, list[tuple[str, ...]]]  # candidate id ("base" = the original) -> one outcome per input
    calls: int = 0  # calls of the function the evidence made (what the inputs derive from)


def probe(tgt: Target, ev: Evidence, candidates: Sequence[tuple[str, str]], *, per_call_timeout: float = 0.25,
          timeout: float = 20.0, max_inputs: int = 120) -> Probe | None:
    """Differential testing: record the arguments the evidence calls the function with, derive
    new inputs from them (keeping what held in every recorded call: types, sorted or distinct
    items, non-negative numbers, an index inside a sequence), and call the original and each
    candidate on them. An outcome is ``("ok", result, arguments after)``, ``("raise", type)``,
    ``("timeout",)`` or ``("unstable",)`` (the original answered differently twice). Only the
    inputs every version was called on are kept (the time budget may stop it early). None when
    the function cannot be probed (a nested function, no call recorded, nothing finished)."""
    if "<" in ev.function:
        return None
    ex = tgt.examples.get(ev.function, [])
    ids = [r.id for r in ev.runs if r.kind == "pytest"]
    if not ex and not ids:
        return None
    spec = {"target": tgt.target, "module": tgt.module, "examples": list(ex), "pytest": ids,
            "pytest_args": tgt.pytest_args, "candidates": [{"id": c, "source": s} for c, s in candidates],
            "coverage": False, "per_run_timeout": 2.0, "out": RESULTS_NAME, "swap": ev.function,
            "probe": True, "probe_timeout": per_call_timeout, "probe_inputs": max_inputs,
            "probe_budget": max(0.5, timeout - 3.0)}
    files = {**tgt.files, RUNNER_NAME: RUNNER, SPEC_NAME: json.dumps(spec)}
    # a fixed hash seed: sets and dicts of strings print in one order in every probe process, so
    # outcomes from different batches compare
    res = sandbox.run("path", RUNNER_NAME, [SPEC_NAME], files=files, timeout=max(1.0, timeout),
                      collect=[RESULTS_NAME], max_file_mb=32,
                      env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONHASHSEED": "0"})
    recs = _parse_results(res.files.get(RESULTS_NAME, ""))
    start = next((r for r in recs if r.get("kind") == "probe_start"), None)
    rows = [r for r in recs if r.get("kind") == "probe" and "base" in r.get("results", {})]
    if start is None or not start.get("calls") or not rows:
        return None
    out = Probe([r.get("input", "") for r in rows], {}, int(start["calls"]))
    for cid in ["base", *(c for c, _ in candidates)]:
        if all(cid in r["results"] for r in rows):
            out.results[cid] = [tuple(r["results"][cid]) for r in rows]
    return out
