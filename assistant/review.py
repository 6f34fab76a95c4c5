# Longer than 600 lines because it holds file selection, the report model and three renderers (text,
# JSON, SARIF) of one command.
"""``moecoder review``: debugging hints and missing docstrings for files or a git diff.

    moecoder review PATH... [--diff REV] [--format text|json|sarif] [--output FILE]
                    [--jobs N] [--min-confidence X] [--fail-on LEVEL] [--no-reasoning]

Walks the given files and directories (Python files; ``.gitignore`` respected, VCS and
virtualenv folders skipped), or with ``--diff REV`` only the functions touched by
``git diff REV`` (changes to tracked files: a new file counts once ``git add`` has seen it). Per function (module-level functions and methods): the ``debug`` task
(rule ``MC001``, level ``warning``) and, for a public function without a docstring, a
``missing docstring`` finding (rule ``MC002``, level ``note``) whose fix is a docstring
written by the ``comment`` task. Generation is batched (``--jobs`` prompts at a time).

Bad input never stops the review: binary files, invalid UTF-8, files that do not parse,
files over ``--max-lines`` lines, unreadable files and directories are reported as
skipped and the rest is reviewed. Ctrl-C stops the review and writes what was found so
far (marked as interrupted).

Exit codes: 0 nothing at or above ``--fail-on``; 1 findings at or above it; 2 usage or
fatal errors (including a PATH that does not exist or cannot be read); 130 interrupted.
The JSON format is documented in ``docs/review-json-schema.json``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assistant import code as codemod
from assistant.diagnostics import Policy, debug_request, functions_touching
from assistant.files import Unreadable, read_bytes, walk_files

if TYPE_CHECKING:  # the review batches generation: it runs on the in-process engine
    from assistant.engine import Engine

LEVELS = ("note", "warning", "error")  # ascending
FAIL_ON = ("error", "warning", "note", "none")
FORMATS = ("text", "json", "sarif")
JSON_SCHEMA_VERSION = 1
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache",
             "node_modules", ".eggs"}
DEFAULT_MAX_LINES = 20_000
DEFAULT_MAX_BYTES = 2_000_000


@dataclass
class Finding:
    path: str
    line: int  # 1-based
    function: str
    rule: str  # "MC001" | "MC002"
    level: str  # "error" | "warning" | "note"
    message: str
    confidence: float
    code: str = ""  # the source line
    fix: str | None = None  # MC001: the replacement line; MC002: the docstring lines to insert
    fix_line: int | None = None  # MC002: 1-based line to insert the fix before
    reasoning: str = ""
    end_line: int | None = None


@dataclass
class Skipped:
    path: str
    reason: str
    explicit: bool = False  # a PATH given on the command line (makes the exit code 2)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    files_reviewed: int = 0
    functions_reviewed: int = 0
    interrupted: bool = False
    fatal: str | None = None
    model: str | None = None
    root: str | None = None
    diff: str | None = None
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from assistant import __version__

        d = dataclasses.asdict(self)
        return {"schema_version": JSON_SCHEMA_VERSION, "tool": {"name": "moecoder", "version": __version__}, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        if not isinstance(d, dict) or d.get("schema_version") != JSON_SCHEMA_VERSION:
            raise ValueError("not a moecoder review report (schema_version 1)")
        body = {k: v for k, v in d.items() if k not in ("schema_version", "tool")}
        body["findings"] = [Finding(**f) for f in body.get("findings", [])]
        body["skipped"] = [Skipped(**s) for s in body.get("skipped", [])]
        return cls(**body)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))


@dataclass
class Options:
    diff: str | None = None
    jobs: int = 4
    min_confidence: float = 0.5
    docstrings: bool = True
    max_lines: int = DEFAULT_MAX_LINES
    max_bytes: int = DEFAULT_MAX_BYTES
    max_new_tokens: int | None = None
    max_seconds: float | None = None
    progress: bool = False
    batch_size: int = 4  # prompts generated together by one engine
    run: bool = False  # run each function's evidence (doctests, tests) and verify fixes: executes code
    tests: tuple[str, ...] = ()  # --tests: extra tests run as evidence (with run)
    run_budget_s: float = 60.0  # per function, with run
    gate: bool = True  # skip generation where the debug gate alone keeps every hint below min_confidence


class UsageError(ValueError):
    pass


# ------------------------------------------------------------------------- collecting files
class _Ignore:
    """``.gitignore`` rules: each file applies to its own directory and below."""

    def __init__(self) -> None:
        import pathspec

        self._pathspec = pathspec
        self.specs: list[tuple[Path, Any]] = []

    def add_dir(self, d: Path) -> None:
        gi = d / ".gitignore"
        try:
            if gi.is_file():
                lines = gi.read_text(encoding="utf-8", errors="replace").splitlines()
                self.specs.append((d, self._pathspec.GitIgnoreSpec.from_lines(lines)))
        except OSError:
            pass

    def add_parents(self, start: Path) -> None:
        """The ``.gitignore`` files above ``start`` up to the repository root."""
        chain = []
        d = start.resolve()
        while True:
            chain.append(d)
            if (d / ".git").exists() or d.parent == d:
                break
            d = d.parent
        for p in reversed(chain[1:]):
            self.add_dir(p)

    def ignored(self, path: Path, is_dir: bool) -> bool:
        rp = path.resolve()
        for base, spec in self.specs:
            try:
                rel = rp.relative_to(base.resolve()).as_posix()
            except ValueError:
                continue
            if rel in ("", "."):
                continue
            if spec.match_file(rel + ("/" if is_dir else "")):
                return True
        return False


def _looks_python(p: Path) -> bool:
    """A file named on the command line: ``.py``/``.pyi``/``.pyw``, or a script with a python ``#!``."""
    if p.suffix in (".py", ".pyi", ".pyw"):
        return True
    try:
        head = read_bytes(p, 200, head=True)
    except Unreadable:
        return True  # let the reader say what is wrong with it
    first = head.split(b"\n", 1)[0]
    return first.startswith(b"#!") and b"python" in first


def collect_files(paths: Sequence[str], skipped: list[Skipped]) -> list[Path]:
    """Python files under ``paths`` (explicit files are taken whatever their suffix)."""
    out: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        p = Path(raw)
        if not p.exists() and not p.is_symlink():
            skipped.append(Skipped(raw, "no such file or directory", explicit=True))
            continue
        if p.is_file():
            if not _looks_python(p):
                skipped.append(Skipped(raw, "not a Python file (no .py suffix or python #! line)", explicit=True))
                continue
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append(p)
            continue
        if not p.is_dir():
            skipped.append(Skipped(raw, "not a regular file or directory", explicit=True))
            continue
        if not os.access(p, os.R_OK | os.X_OK):
            skipped.append(Skipped(raw, "permission denied", explicit=True))
            continue
        ignore = _Ignore()
        ignore.add_parents(p)
        ignore.add_dir(p)

        def keep_dir(dp: Path, ignore: _Ignore = ignore) -> bool:
            if dp.name in SKIP_DIRS or (dp / "pyvenv.cfg").exists() or ignore.ignored(dp, True):
                return False
            ignore.add_dir(dp)
            return True

        def on_skip(path: str, why: str) -> None:
            skipped.append(Skipped(_display_path(Path(path)), why))

        for fp in walk_files(p, on_skip, keep_dir):
            if not fp.name.endswith(".py") or ignore.ignored(fp, False):
                continue
            if fp.resolve() not in seen:
                seen.add(fp.resolve())
                out.append(fp)
    return out


def read_python(path: Path, max_lines: int, max_bytes: int) -> tuple[str | None, str | None]:
    """(source, None) or (None, reason it is skipped)."""
    try:
        data = read_bytes(path, max_bytes * 4)  # "too many lines" is the clearer reason below
    except Unreadable as e:
        return None, str(e)
    if b"\0" in data[:8192]:
        return None, "binary file"
    lines = data.count(b"\n") + 1
    if lines > max_lines:
        return None, f"too many lines ({lines} > {max_lines}; see --max-lines)"
    if len(data) > max_bytes:
        return None, f"too large ({len(data)} bytes)"
    try:
        text = data.decode("utf-8-sig")  # a BOM is not part of the code
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {e.start})"
    try:
        ast.parse(text, filename=str(path))
    except SyntaxError as e:
        return None, f"does not parse: {e.msg} (line {e.lineno})"
    except (ValueError, RecursionError, MemoryError) as e:
        return None, f"does not parse: {type(e).__name__}"
    return text, None


# ------------------------------------------------------------------------- git diff
_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


def parse_diff(text: str) -> dict[str, set[int]]:
    """Changed lines (0-based, new side) per file from ``git diff -U0`` output."""
    out: dict[str, set[int]] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("+++ "):
            target = line[4:].strip()
            if target == "/dev/null":
                current = None
            else:
                current = target[2:] if target.startswith("b/") else target
                out.setdefault(current, set())
            continue
        m = _HUNK.match(line)
        if m and current is not None:
            start, count = int(m.group(1)), int(m.group(2) if m.group(2) is not None else 1)
            if count == 0:  # pure deletion after line `start`
                out[current].add(max(start - 1, 0))
            else:
                out[current].update(range(start - 1, start - 1 + count))
    return out


def git_changed_lines(rev: str, paths: Sequence[str]) -> tuple[Path, dict[Path, set[int]]]:
    """(repository root, changed lines per file path) of ``git diff -U0 REV -- PATHS``."""
    if rev.startswith("-"):
        raise UsageError(f"--diff: not a revision: {rev!r}")
    paths = list(paths) or ["."]
    roots = set()
    for raw in paths:  # the repository of PATH, wherever the review is started from
        p = Path(raw)
        where = p if p.is_dir() else p.parent
        if not where.is_dir():
            continue  # a missing PATH is reported as skipped
        try:
            top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel"], capture_output=True,
                                 text=True, check=False)
        except FileNotFoundError:
            raise UsageError("--diff needs git, which is not installed") from None
        if top.returncode != 0:
            raise UsageError(f"--diff: {raw} is not inside a git repository")
        roots.add(Path(top.stdout.strip()))
    if len(roots) > 1:
        raise UsageError("--diff: the PATHs are in different git repositories; review them one at a time")
    if not roots:
        raise UsageError("--diff: no PATH exists")
    root = roots.pop()
    abs_paths = [str(Path(p).resolve()) for p in paths]
    r = subprocess.run(["git", "-C", str(root), "diff", "-U0", "--no-color", "--no-ext-diff", "--relative",
                        rev, "--", *abs_paths], capture_output=True, text=True, check=False,
                       encoding="utf-8", errors="replace")
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["git diff failed"])[0]
        raise UsageError(f"--diff {rev}: {msg}")
    return root, {root / k: v for k, v in parse_diff(r.stdout).items()}


# ------------------------------------------------------------------------- reviewing
def reviewable_functions(source: str) -> list[codemod.Scope]:
    """Module-level functions and methods (not functions nested in functions), as trained."""
    return codemod.task_functions(source)


def _is_public(f: codemod.Scope) -> bool:
    return not any(part.startswith("_") for part in f.qualname.split("."))


@dataclass
class _Job:
    path: str
    source: str
    func: codemod.Scope
    kind: str  # "debug" | "docstring"


def _display_path(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def plan_review(paths: Sequence[str], opts: Options, report: Report) -> list[_Job]:
    """Files -> the per-function jobs; bad files go to ``report.skipped``."""
    changed: dict[Path, set[int]] | None = None
    if opts.diff:
        _root, changed = git_changed_lines(opts.diff, paths)
        report.diff = opts.diff
        files = []
        for p, _lines in sorted(changed.items()):
            if p.suffix == ".py" and p.exists():
                files.append(p)
        changed = {p.resolve(): v for p, v in changed.items()}
        for raw in paths:
            if not Path(raw).exists():
                report.skipped.append(Skipped(raw, "no such file or directory", explicit=True))
    else:
        files = collect_files(paths, report.skipped)
    jobs: list[_Job] = []
    for fp in files:
        shown = _display_path(fp)
        src, why = read_python(fp, opts.max_lines, opts.max_bytes)
        if src is None:
            explicit = any(Path(raw).resolve() == fp.resolve() for raw in paths)
            report.skipped.append(Skipped(shown, why or "unreadable", explicit=explicit))
            continue
        report.files_reviewed += 1
        funcs = reviewable_functions(src)
        if changed is not None:
            funcs = functions_touching(src, changed.get(fp.resolve(), set()))
        for f in funcs:
            jobs.append(_Job(shown, src, f, "debug"))
            if opts.docstrings and f.docstring is None and _is_public(f):
                jobs.append(_Job(shown, src, f, "docstring"))
    report.functions_reviewed = len({(j.path, j.func.start_line) for j in jobs})
    return jobs


def _requests(jobs: list[_Job], opts: Options) -> list[Any]:
    from assistant.tasks import TaskRequest

    # the threshold rides with each debug request: a function whose gate keeps any hint below it
    # is settled by one forward pass, without generating reasoning and an answer nobody sees
    return [debug_request(j.source, j.path, j.func.qualname, j.func.start_line, max_new_tokens=opts.max_new_tokens,
                          max_seconds=opts.max_seconds, min_confidence=opts.min_confidence if opts.gate else None)
            if j.kind == "debug" else
            TaskRequest("comment", j.source, j.path, line=j.func.start_line, max_new_tokens=opts.max_new_tokens,
                        max_seconds=opts.max_seconds) for j in jobs]


def _findings(job: _Job, result: Any, opts: Options) -> list[Finding]:
    from assistant.tasks import DebugResult, Docstring

    src_lines = job.source.split("\n")
    out: list[Finding] = []
    if isinstance(result, DebugResult):
        policy = Policy(opts.min_confidence)
        for h in policy.keep(result.hints):
            code = src_lines[h.line] if 0 <= h.line < len(src_lines) else ""
            out.append(Finding(job.path, h.line + 1, job.func.qualname, "MC001", policy.level(h.confidence),
                               h.message, h.confidence, code, h.fix, None, h.reasoning))
    elif isinstance(result, Docstring):
        code = src_lines[job.func.start_line]
        lit = result.text.split("\n")
        fix = "\n".join([result.indent + lit[0], *lit[1:]])
        out.append(Finding(job.path, job.func.start_line + 1, job.func.qualname, "MC002", "note",
                           f"public function `{job.func.name}` has no docstring", 1.0, code, fix,
                           result.insert_line + 1, result.reasoning))
    return out


def run_review(paths: Sequence[str], opts: Options, engine: Engine | None, report: Report | None = None,
               pool: Any = None) -> Report:
    """Review ``paths``; fills and returns ``report``. KeyboardInterrupt marks it interrupted
    (partial results kept) and is not re-raised. The model calls run on ``engine`` (batched
    ``opts.batch_size`` prompts at a time) or, given one, on ``pool``'s worker processes
    (:class:`assistant.workers.WorkerPool`)."""
    report = report or Report()
    t0 = time.monotonic()
    try:
        jobs = plan_review(paths, opts, report)
    except KeyboardInterrupt:
        report.interrupted = True
        jobs = []
    finally:
        report.elapsed_s = round(time.monotonic() - t0, 3)
    return execute_review(jobs, opts, engine, report, pool=pool, t0=t0)


def execute_review(jobs: list[_Job], opts: Options, engine: Engine | None, report: Report, pool: Any = None,
                   t0: float | None = None) -> Report:
    """Run planned jobs (:func:`plan_review`) into ``report``; see :func:`run_review`."""
    from assistant.engine import CancelToken, EngineError
    from assistant.tasks import iter_batch

    t0 = time.monotonic() if t0 is None else t0
    cancel = CancelToken()
    progress = None
    requests = _requests(jobs, opts)
    # a function is reviewed when its results are in: the bar and the counters count functions,
    # as the header does (a function has a debug job and maybe a docstring job)
    left: dict[tuple[str, int], int] = {}
    for j in jobs:
        key = (j.path, j.func.start_line)
        left[key] = left.get(key, 0) + 1
    report.functions_reviewed = 0
    try:
        if report.interrupted:
            raise KeyboardInterrupt
        if opts.progress and requests:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            progress = Progress(TextColumn("reviewing"), BarColumn(), MofNCompleteColumn(), TextColumn("functions"),
                                TimeRemainingColumn(), TextColumn("{task.description}"),
                                console=Console(stderr=True), transient=True)
            progress.start()
            task = progress.add_task("", total=len(left))
        if pool is not None:
            results = pool.run(requests, batch_size=opts.batch_size)
        else:
            results = iter_batch(engine, requests, batch_size=opts.batch_size, cancel=cancel)
        started: set[tuple[str, int]] = set()
        for i, result in results:
            job = jobs[i]
            key = (job.path, job.func.start_line)
            if isinstance(result, EngineError | Exception):
                report.skipped.append(Skipped(f"{job.path}::{job.func.qualname}", f"{job.kind} failed: {result}"))
            else:
                report.findings.extend(_findings(job, result, opts))
                if key not in started:  # counted once its first result is in: findings never outnumber it
                    started.add(key)
                    report.functions_reviewed += 1
            left[key] -= 1
            if progress is not None and left[key] == 0:
                progress.update(task, advance=1, description=job.path)
    except KeyboardInterrupt:
        cancel.cancel()
        report.interrupted = True
    finally:
        if progress is not None:
            progress.stop()
        report.elapsed_s = round(time.monotonic() - t0, 3)
    if opts.run and not report.interrupted:
        try:
            _run_evidence(jobs, opts, engine if pool is None else None, report)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            report.elapsed_s = round(time.monotonic() - t0, 3)  # the summary's time includes running the code
    report.findings.sort(key=lambda f: (f.path, f.line, f.rule))
    return report


def _run_evidence(jobs: list[_Job], opts: Options, engine: Engine | None, report: Report) -> None:
    """``--run``: for each reviewed function with evidence (doctest examples, tests that call
    it, ``--tests``), debugging from evidence (:mod:`assistant.debugging`) replaces the model's
    hint: verified fixes, failing runs, or "all runs pass". A function whose evidence cannot
    run is reported as skipped and the review goes on."""
    from assistant import debugging

    dopts = debugging.DebugOptions(tests=opts.tests, budget_s=opts.run_budget_s, use_model=engine is not None)
    targets: dict[str, Any] = {}
    seen: set[tuple[str, str]] = set()
    todo = []
    for job in jobs:
        key = (job.path, job.func.qualname)
        if job.kind == "debug" and key not in seen:
            seen.add(key)
            todo.append(job)
    progress = None
    if opts.progress and todo:  # running and repairing takes seconds a function: say what runs
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("running examples and tests"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("functions"), TimeElapsedColumn(), TextColumn("{task.description}"),
                            console=Console(stderr=True), transient=True)
        progress.start()
        task = progress.add_task("", total=len(todo))
    try:
        for job in todo:
            if progress is not None:
                progress.update(task, description=f"{job.path}::{job.func.qualname}")
            _evidence_for(job, opts, engine, dopts, targets, report)
            if progress is not None:
                progress.update(task, advance=1)
    finally:
        if progress is not None:
            progress.stop()


def _evidence_for(job: _Job, opts: Options, engine: Engine | None, dopts: Any, targets: dict[str, Any],
                  report: Report) -> None:
    """One function's evidence run; its verified fix or failing runs replace the model's hint."""
    from assistant import debugging, evidence

    try:
        if job.path not in targets:
            targets[job.path] = evidence.prepare(job.path, job.source, [], tests=opts.tests)
        tgt = targets[job.path]
        if not tgt.examples.get(job.func.qualname) and not tgt.tests.get(job.func.qualname):
            return  # nothing to run: the model's hint stays
        result, _rep = debugging.debug_function(engine, tgt, job.func.qualname, job.path, dopts)
    except (evidence.EvidenceError, OSError) as e:
        report.skipped.append(Skipped(f"{job.path}::{job.func.qualname}", f"--run: {e}"))
        return
    except Exception as e:  # noqa: BLE001 - one function's trouble never stops the review
        report.skipped.append(Skipped(f"{job.path}::{job.func.qualname}", f"--run failed: {type(e).__name__}: {e}"))
        return
    report.findings = [f for f in report.findings
                       if not (f.rule == "MC001" and f.path == job.path and f.function == job.func.qualname)]
    report.findings.extend(_findings(job, result, opts))


# ------------------------------------------------------------------------- output
def render_text(report: Report, reasoning: bool = True, color: bool = False) -> str:
    from rich.console import Console
    from rich.markup import escape

    buf = io.StringIO()
    con = Console(file=buf, force_terminal=color, no_color=not color, highlight=False, width=200, soft_wrap=True)
    title = (f"# moecoder review: {_plural(report.files_reviewed, 'file')}, "
             f"{_plural(report.functions_reviewed, 'function')}")
    if report.diff:
        title += f" changed since {report.diff}"
    con.print(escape(title), style="bold")
    current = None
    for f in report.findings:
        if f.path != current:
            current = f.path
            con.print()
            con.print(escape(f.path), style="bold underline")
        if reasoning and f.reasoning:
            for j, ln in enumerate(f.reasoning.strip().split("\n")):
                con.print(("  why: " if j == 0 else "       ") + escape(ln), style="dim")
        style = {"error": "bold red", "warning": "yellow", "note": "cyan"}[f.level]
        con.print(f"  {escape(f.path)}:{f.line}: [{style}]{f.level}[/]: {escape(f.message)} "
                  f"[dim]\\[{f.rule}] (confidence {f.confidence:.2f}) in {escape(f.function)}[/]")
        if f.code:
            con.print(f"  {f.line:>6} | " + escape(f.code))
        if f.fix:
            lines = f.fix.split("\n")
            if f.rule == "MC001":
                con.print("         [green]fix:[/] " + escape(lines[0].strip()))
            else:
                con.print("         [green]suggested docstring:[/]")
                for ln in lines:
                    con.print("         + " + escape(ln), style="green")
    if report.skipped:
        con.print()
        for s in report.skipped:
            con.print(f"skipped: {escape(s.path)}: {escape(s.reason)}", style="magenta")
    counts = {lv: sum(1 for f in report.findings if f.level == lv) for lv in LEVELS}
    parts = [f"{n} {lv}{'s' if n != 1 else ''}" for lv, n in reversed(counts.items()) if n]
    con.print()
    summary = (f"{len(report.findings)} finding{'s' if len(report.findings) != 1 else ''}"
               + (f" ({', '.join(parts)})" if parts else "")
               + f" in {_plural(report.functions_reviewed, 'function')} of {_plural(report.files_reviewed, 'file')}"
               + (f"; {len(report.skipped)} skipped" if report.skipped else "")
               + f"; {report.elapsed_s:.1f}s")
    if report.interrupted:
        summary += "; INTERRUPTED: results are partial"
    con.print(escape(summary), style="bold")
    return buf.getvalue()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render(report: Report, fmt: str, reasoning: bool = True, color: bool = False) -> str:
    if fmt == "json":
        rep = report
        if not reasoning:
            rep = dataclasses.replace(report, findings=[dataclasses.replace(f, reasoning="") for f in report.findings])
        return rep.to_json()
    if fmt == "sarif":
        from assistant.sarif import to_sarif

        rep = report
        if not reasoning:
            rep = dataclasses.replace(report, findings=[dataclasses.replace(f, reasoning="") for f in report.findings])
        return json.dumps(to_sarif(rep), indent=2, ensure_ascii=False) + "\n"
    return render_text(report, reasoning, color)


def _ours(path: Path) -> bool:
    """Whether ``path`` holds an earlier moecoder report (safe to overwrite)."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return False
    return head.startswith("# moecoder review") or '"name": "moecoder"' in head


def write_output(text: str, output: str | None, force: bool) -> None:
    if output is None or output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    p = Path(output)
    if p.is_dir():
        raise UsageError(f"--output {output}: is a directory")
    if p.exists() and not force and not _ours(p):
        raise UsageError(f"--output {output}: exists and is not a moecoder report (use --force to overwrite)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"--output {output}: directory {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exit_code(report: Report, fail_on: str) -> int:
    if report.interrupted:
        return 130
    if report.fatal or any(s.explicit for s in report.skipped):
        return 2
    if fail_on == "none":
        return 0
    threshold = LEVELS.index(fail_on)
    return 1 if any(LEVELS.index(f.level) >= threshold for f in report.findings) else 0


# ------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecoder review",
                                description="Review Python files (or a git diff): debugging hints and missing "
                                            "docstrings, with the model's reasoning.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="files and directories to review (with --diff: default '.', the current repository)")
    p.add_argument("--diff", metavar="REV", help="review only the functions touched by `git diff REV`")
    p.add_argument("--format", choices=FORMATS, default="text", help="output format (default: text)")
    p.add_argument("--output", "-o", metavar="FILE", help="write the report to FILE (default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite --output even if it is not a moecoder report")
    p.add_argument("--jobs", "-j", type=int, default=None, metavar="N",
                   help="worker processes, each with its own model and a share of the CPU threads (at most "
                        "the CPUs there are; default: review.jobs of the config file, 4, lowered to the idle "
                        "CPUs + 1 on a busy machine)")
    p.add_argument("--min-confidence", type=float, default=None, metavar="X",
                   help="drop debug hints below this confidence, 0..1 (default 0.5, or review.min_confidence "
                        "in the config file)")
    p.add_argument("--fail-on", choices=FAIL_ON, default=None,
                   help="exit 1 when a finding at or above this level is found (default: warning)")
    p.add_argument("--no-reasoning", action="store_true", help="leave the model's reasoning out of the report")
    p.add_argument("--no-docstrings", action="store_true", help="do not check for missing docstrings")
    p.add_argument("--max-lines", type=int, default=DEFAULT_MAX_LINES, metavar="N",
                   help=f"skip files longer than N lines (default {DEFAULT_MAX_LINES})")
    p.add_argument("--model", metavar="DIR", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="most new tokens per function")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S", help="time limit per batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--run", action="store_true",
                   help="run each function's doctest examples and the tests that call it in a sandbox; hints "
                        "then come from the runs and fixes are verified (this executes the code: opt-in)")
    p.add_argument("--tests", metavar="PATH[::NODE]", action="append", default=[],
                   help="with --run: more tests to run as evidence (repeatable)")
    return p


class _loading:
    """A spinner on stderr while the model loads (a terminal only)."""

    def __init__(self, show: bool, text: str):
        self.status = None
        if show:
            from rich.console import Console

            self.status = Console(stderr=True).status(text + "...")

    def __enter__(self) -> _loading:
        if self.status is not None:
            self.status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.stop()


REQUESTS_PER_WORKER = 8  # a worker process pays a model load: only when it has this much to do


def _start_engine(settings: Any, model: str | None, jobs: int, n_jobs: int,
                  adaptive: bool = False) -> tuple[Any, Any]:
    """(engine, None) for one in-process engine, or (None, WorkerPool) for ``jobs`` > 1 workers."""
    from assistant.workers import WorkerPool, default_workers

    workers = min(default_workers(jobs, adaptive), max(1, n_jobs // REQUESTS_PER_WORKER))
    if workers > 1 and not getattr(settings, "server", None):
        pool = WorkerPool(settings, model, workers)
        try:
            pool.wait_ready()
        except BaseException:
            pool.close()
            raise
        return None, pool
    from assistant.engine import Engine

    return Engine.from_settings(settings, model), None


def main(argv: Sequence[str] | None = None, engine: Engine | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(args_in)
    except SystemExit as e:
        return 0 if e.code in (0, None) else 2

    def fail(msg: str) -> int:
        print(f"moecoder review: error: {msg}", file=sys.stderr)
        return 2

    from assistant.config import load_settings

    try:
        settings = load_settings().for_face("review")
    except ValueError as e:
        return fail(str(e))
    if not args.paths:
        if not args.diff:
            parser.print_usage(sys.stderr)
            return fail("give at least one PATH to review (or --diff REV for the current repository's changes)")
        args.paths = ["."]
    jobs = args.jobs if args.jobs is not None else settings.review.jobs
    min_conf = args.min_confidence if args.min_confidence is not None else settings.review.min_confidence
    fail_on = args.fail_on or settings.review.fail_on
    if jobs < 1:
        return fail("--jobs must be at least 1")
    if not 0.0 <= min_conf <= 1.0:
        return fail("--min-confidence must be between 0 and 1")
    if args.max_lines < 1:
        return fail("--max-lines must be at least 1")
    if args.max_tokens is not None and args.max_tokens < 1:
        return fail("--max-tokens must be at least 1")
    if args.max_seconds is not None and args.max_seconds <= 0:
        return fail("--max-seconds must be positive")
    if args.output and args.output != "-":
        out = Path(args.output)
        if out.is_dir():
            return fail(f"--output {args.output}: is a directory")
        if out.exists() and not args.force and not _ours(out):
            return fail(f"--output {args.output}: exists and is not a moecoder report (use --force to overwrite)")
    opts = Options(diff=args.diff, jobs=jobs, min_confidence=min_conf, docstrings=not args.no_docstrings,
                   max_lines=args.max_lines, max_new_tokens=args.max_tokens, max_seconds=args.max_seconds,
                   progress=not args.no_progress and sys.stderr.isatty(),
                   run=args.run or bool(args.tests), tests=tuple(args.tests))
    for t in args.tests:
        if not Path(t.split("::", 1)[0]).exists():
            return fail(f"--tests {t}: no such file")
    report = Report(model=args.model or settings.model, root=os.getcwd())
    own_engine = engine is None
    pool = None
    terminated = []

    def on_term(signum: int, _frame: Any) -> None:  # SIGTERM: stop like Ctrl-C, write the partial report
        terminated.append(signum)
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    t0 = time.monotonic()
    try:
        try:
            planned = plan_review(args.paths, opts, report)  # before the model loads: bad input fails fast
        except UsageError as e:
            return fail(str(e))
        if planned and engine is None:
            try:
                with _loading(opts.progress, "loading the model"):
                    engine, pool = _start_engine(settings, args.model, jobs, len(planned),
                                                 adaptive=args.jobs is None)
            except (ValueError, OSError) as e:
                return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        execute_review(planned, opts, engine, report, pool=pool, t0=t0)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if pool is not None:
            pool.close()
        if own_engine and engine is not None:
            engine.close()
    color = args.output in (None, "-") and args.format == "text" and sys.stdout.isatty()
    text = render(report, args.format, reasoning=not args.no_reasoning, color=color)
    try:
        write_output(text, args.output, args.force)
    except UsageError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"cannot write {args.output}: {e.strerror or e}")
    if args.format != "text" or args.output not in (None, "-"):  # text on stdout already lists them
        for s in report.skipped:
            if s.explicit:
                print(f"moecoder review: {s.path}: {s.reason}", file=sys.stderr)
    if report.interrupted:
        why = "terminated" if terminated else "interrupted"
        print(f"moecoder review: {why}; partial results written", file=sys.stderr)
        return 143 if terminated else 130
    if not opts.diff and report.files_reviewed == 0:
        what = " ".join(args.paths)
        if report.skipped:
            return fail(f"nothing reviewed: no file under {what} could be reviewed ({len(report.skipped)} skipped)")
        return fail(f"nothing to review: no Python files under {what}")
    return exit_code(report, fail_on)
