"""Benchmarks of the assistant: context-manager time and review throughput.

    python -m assistant.bench [--model DIR] [--lines 10000] [--jobs 4] [--max-tokens N] [--skip-review]
                              [--random-preset small] [--calibration N [--seed S] [--legacy-confidence]]
    python -m assistant.bench --review-path DIR --review-jobs default [--review-baseline REV] [--review-rounds N]
    python -m assistant.bench --repo-memory DIR [--model DIR] [--threads 2]

Prints the machine, versions and date, then

* the context manager's time on a synthetic N-line Python file (tree-sitter parse
  separately; ``build_context`` with a cold and with a warm per-line token cache, the
  median over cursors spread through the file), and
* functions reviewed per second by ``moecoder review`` on ``examples/buggy`` (debug hints
  + missing-docstring suggestions, batched ``--jobs`` prompts at a time) with the tiny
  preset (random weights, built on the fly: every answer runs to the token limit) and
  with the shipped model (``model/weights/``) when it is there, or ``--model DIR``.

``--review-path DIR`` only times ``moecoder review DIR`` end to end (fresh processes, model load
included); ``--review-baseline REV`` runs the same review from revision REV's tree too, in the
same run, and says whether the findings are identical (the review-throughput numbers of
docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def versions() -> str:
    import importlib.metadata as md

    out = [f"python {platform.python_version()}"]
    for pkg in ("torch", "tree-sitter", "tree-sitter-python", "sentencepiece"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def synthetic_source(n_lines: int) -> str:
    """A plausible Python file of about ``n_lines`` lines: imports, classes, functions."""
    parts = ["import os\nimport sys\nfrom typing import Any\n\n\n"]
    i = 0
    lines = 5
    while lines < n_lines:
        if i % 5 == 0:
            chunk = (f"class Widget{i}:\n    \"\"\"A widget.\"\"\"\n\n    def size(self, k: int) -> int:\n"
                     f"        total = k * {i}\n        for j in range(k):\n            total += j\n"
                     f"        return total\n\n    def name(self) -> str:\n        return 'w{i}é'\n\n\n")
        else:
            chunk = (f"def compute_{i}(a, b=2):\n    \"\"\"Compute {i}.\"\"\"\n    x = a + b * {i}\n"
                     f"    if x > {i}:\n        x -= 1\n    return x\n\n\n")
        parts.append(chunk)
        lines += chunk.count("\n")
        i += 1
    return "".join(parts)


def tiny_tokenizer(workdir: Path):
    from model.tokenizer import Tokenizer, train_tokenizer

    files = sorted((ROOT / "model").rglob("*.py")) + sorted((ROOT / "assistant").glob("*.py"))
    path = train_tokenizer(files, workdir / "tokenizer", vocab_size=512)
    return Tokenizer.load(path), path


def shipped_dir(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    from model.checkpoint import default_model_dir

    d = Path(default_model_dir())
    return d if (d / "config.json").exists() else None


def _display(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def bench_context(tok, n_lines: int, budget: int, label: str) -> dict[str, float]:
    from assistant import code as codemod
    from assistant.context import _COUNTERS, build_context

    src = synthetic_source(n_lines)
    lines = src.split("\n")
    t0 = time.perf_counter()
    codemod.parse(src)
    codemod.scopes(src)
    codemod.import_lines(src)
    parse_ms = (time.perf_counter() - t0) * 1000
    cursors = [int(len(lines) * f) for f in (0.1, 0.3, 0.5, 0.7, 0.9)]
    cold, warm = [], []
    for c in cursors:
        _COUNTERS.clear()
        t0 = time.perf_counter()
        r = build_context(tok, src, c, 4, budget=budget)
        cold.append((time.perf_counter() - t0) * 1000)
        assert len(r.prompt_ids) <= budget
        t0 = time.perf_counter()
        build_context(tok, src, c, 4, budget=budget)
        warm.append((time.perf_counter() - t0) * 1000)
    res = {"lines": len(lines), "parse_ms": parse_ms, "cold_ms": statistics.median(cold),
           "warm_ms": statistics.median(warm), "budget": budget}
    print(f"context [{label}]: {len(lines)} lines, budget {budget} tokens: parse+scopes {parse_ms:.1f} ms; "
          f"build_context median {res['cold_ms']:.1f} ms cold cache, {res['warm_ms']:.1f} ms warm "
          f"(over {len(cursors)} cursors)")
    return res


def bench_review(model_dir: Path, label: str, jobs: int, max_tokens: int | None) -> dict[str, float]:
    from assistant.engine import Engine
    from assistant.review import Options, Report, run_review

    t0 = time.perf_counter()
    engine = Engine(str(model_dir))
    load_s = time.perf_counter() - t0
    generated = [0, 0]  # tokens, batches
    inner = engine.backend.generate_batch

    def counting(prompts, params, cancel=None):
        outs = inner(prompts, params, cancel)
        generated[0] += sum(len(o.token_ids) for o in outs)
        generated[1] += 1
        return outs

    engine.backend.generate_batch = counting  # type: ignore[method-assign]
    opts = Options(batch_size=jobs, max_new_tokens=max_tokens)  # one in-process engine, `jobs` prompts a batch
    report = Report()
    t0 = time.perf_counter()
    run_review([str(ROOT / "examples" / "buggy")], opts, engine, report)
    dt = time.perf_counter() - t0
    engine.close()
    n = report.functions_reviewed
    rate = n / dt if dt else 0.0
    print(f"review [{label}]: {n} functions ({len(report.findings)} findings) in {dt:.1f} s = "
          f"{rate:.2f} functions/s; {generated[0]} tokens generated in {generated[1]} batches "
          f"({generated[0] / dt:.1f} tokens/s; jobs {jobs}, max tokens {max_tokens or 'default'}; "
          f"model load {load_s:.1f} s)")
    return {"functions": n, "seconds": dt, "rate": rate, "tokens": generated[0]}


def _baseline_tree(rev: str) -> Path:
    """The repository at ``rev`` (``git archive``) in a temporary directory: the "before" of a
    before/after run."""
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="moecoder-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev], capture_output=True,
                             check=False)
    if archive.returncode != 0:
        raise SystemExit(f"--review-baseline {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def _report_key(rep: dict) -> list[tuple]:
    return [(f["path"], f["line"], f["rule"], f["confidence"], f["message"], f["fix"], f["reasoning"])
            for f in rep.get("findings", [])]


def bench_review_path(path: str, jobs_list: list[str], model: str | None, max_tokens: int | None,
                      baseline: str | None = None, rounds: int = 1) -> None:
    """``moecoder review PATH [--jobs N]`` end to end (a fresh process each: model load included),
    for each N (``default``: no ``--jobs``, the review's defaults): wall time, functions per
    second, the children's peak RSS. With ``baseline`` (a git revision) the same review also
    runs from that revision's tree, alternating with this tree, and the findings are compared."""
    import json
    import resource
    import subprocess

    trees = [("this tree", ROOT)]
    if baseline:
        trees.insert(0, (f"baseline {baseline}", _baseline_tree(baseline)))
    where = Path(path).resolve().parent  # both trees show the same relative paths
    reports: dict[str, dict] = {}
    for r_i in range(rounds):
        for jobs in jobs_list:
            for label, tree in trees if r_i % 2 == 0 else trees[::-1]:
                out = Path(tempfile.mkdtemp(prefix="moecoder-bench-")) / "r.json"
                cmd = [sys.executable, "-m", "assistant.cli", "review", str(Path(path).resolve()), "--format",
                       "json", "--output", str(out), "--no-progress"]
                if jobs != "default":
                    cmd += ["--jobs", jobs]
                if model:
                    cmd += ["--model", model]
                if max_tokens:
                    cmd += ["--max-tokens", str(max_tokens)]
                env = {**os.environ, "PYTHONPATH": str(tree)}
                load = os.getloadavg()[0]
                t0 = time.perf_counter()
                r = subprocess.run(cmd, cwd=where, env=env, capture_output=True, text=True)
                dt = time.perf_counter() - t0
                what = f"[{label}] review {path} --jobs {jobs}"
                if not out.exists():
                    print(f"{what}: failed (exit {r.returncode}): {r.stderr.strip()[-300:]}")
                    continue
                rep = json.loads(out.read_text())
                reports[label] = rep
                n = rep.get("functions_reviewed", 0)
                rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
                print(f"{what}: {n} functions in {dt:.1f} s wall (model load included) = {n / dt:.2f} "
                      f"functions/s; {len(rep.get('findings', []))} findings; load average {load:.1f} at the "
                      f"start; largest process so far {rss:.0f} MiB peak RSS", flush=True)
    if baseline and len(reports) == 2:
        before, after = (_report_key(reports[label]) for label, _ in trees)
        same = before == after
        print(f"findings before/after: {'identical' if same else 'DIFFERENT'} ({len(before)} / {len(after)}; "
              f"{len(set(before) - set(after))} only before, {len(set(after) - set(before))} only after)")


_STANDIN = r"""
import resource, sys, time
from assistant.engine import Backend, Engine
from assistant.review import Options, Report, plan_review, _requests, _findings
from assistant.tasks import iter_batch
from model.generate import GenerationResult
from model.checkpoint import default_model_dir
from model.tokenizer import Tokenizer

class Echo(Backend):  # answers at once: the review's own cost, not the model's
    def __init__(self, tok):
        self.tokenizer, self.context_length = tok, 2048
        self.answer = tok.encode("Takes the input.") + [tok.special_id("think_end")] + tok.encode("no issue") + [tok.eos_id]
    def generate_batch(self, prompts, params, cancel=None):
        return [GenerationResult(text="", token_ids=list(self.answer), logprobs=[-0.1] * len(self.answer),
                                 finish_reason="eos") for _ in prompts]
    def token_logprobs(self, ids):
        return [-1.0] * len(ids)

engine = Engine.from_loaded(backend=Echo(Tokenizer.load(default_model_dir())))
opts = Options(max_lines=10**6, max_bytes=10**8)
report = Report()
t0 = time.perf_counter()
jobs = plan_review([sys.argv[1]], opts, report)
reqs = _requests(jobs, opts)
window = len(reqs) if sys.argv[2] == "all" else None
n = 0
for i, res in iter_batch(engine, reqs, batch_size=4, window=window):
    _findings(jobs[i], res, opts)
    n += 1
engine.close()
print(f"{len(reqs)} requests ({report.files_reviewed} file, {len({(j.path, j.func.start_line) for j in jobs})} "
      f"functions) in {time.perf_counter() - t0:.1f} s; peak RSS "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
"""


def bench_review_memory(n_lines: int) -> None:
    """Peak RSS of reviewing one ``n_lines``-line file with a stand-in model that answers at once:
    every request planned up front (the old way) vs a window at a time (now)."""
    import subprocess

    work = Path(tempfile.mkdtemp(prefix="moecoder-bench-"))
    f = work / "big.py"
    f.write_text(synthetic_source(n_lines))
    print(f"review memory, one file of {f.read_text().count(chr(10))} lines (stand-in model):")
    for mode, label in (("all", "all requests planned up front (before)"), ("window", "a window at a time (now)")):
        r = subprocess.run([sys.executable, "-c", _STANDIN, str(f), mode], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        print(f"  {label}: {(r.stdout.strip() or r.stderr.strip()[-300:])}", flush=True)


def bench_loop_guard(n: int, max_tokens: int) -> None:
    """The repetition guard on the comment task: ``n`` documented functions of held-out code
    (the standard library), docstring removed, written by the shipped model without and with
    the guard: ROUGE-L F1 against the real docstring, outputs with a unit repeated three times
    in a row, outputs the guard changed."""
    import ast
    import json as _json

    from assistant.evaluate import ModelPredictor, rouge_l
    from model.checkpoint import load_model
    from model.repetition import LoopGuard

    mods = [_json.decoder, _json.encoder]
    import csv
    import fractions
    import shlex
    import textwrap

    mods += [textwrap, shlex, csv, fractions]
    recs = []
    for m in mods:
        src = Path(m.__file__).read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and (doc := ast.get_docstring(node)) and len(node.body) > 1:
                code = ast.get_source_segment(src, node) or ""
                first = node.body[0]
                lines = code.split("\n")
                a, b = first.lineno - node.lineno, first.end_lineno - node.lineno
                recs.append(("\n".join(lines[:a] + lines[b + 1:]), doc))
    recs = recs[:n]
    loaded = load_model(None)
    guard = LoopGuard(loaded.tokenizer)
    out = {}
    for g in (0, 8):
        pred = ModelPredictor(loaded, batch_size=8, loop_guard=g).task("comment", [c for c, _ in recs], max_tokens)
        answers = [p[1] if p else "" for p in pred]
        loops = 0
        for ans in answers:
            ids = loaded.tokenizer.encode(ans)
            loops += any(guard.banned(ids[:k]) and ids[k] in guard.banned(ids[:k]) for k in range(len(ids)))
        score = statistics.mean(rouge_l(a, d) for a, (_, d) in zip(answers, recs))
        out[g] = answers
        print(f"  comment, loop guard {g}: ROUGE-L F1 {score:.3f} over {len(recs)} stdlib functions; "
              f"{loops} answers with a unit repeated 3x in a row", flush=True)
    changed = sum(a != b for a, b in zip(out[0], out[8]))
    print(f"  the guard changed {changed} of {len(recs)} answers")


def bench_calibration(n: int, seed: int, jobs: int, model_dir: Path | None, legacy: bool = False) -> None:
    """Debug hints on held-out code: this repository's own functions (the model never saw
    them), ``n`` untouched and ``n`` with one injected bug (``model.data.tasks.mutate``).
    The confidence is the calibrated first-token gate of ``assistant.tasks`` (threshold from
    ``scripts/calibrate_debug.py``), or with ``legacy`` the older answer-probability x
    surprisal-rank confidence, for comparison."""
    import random

    from assistant import tasks as tasks_mod
    from assistant.engine import Engine
    from assistant.tasks import TaskRequest, iter_batch
    from model.data.tasks import extract_functions, mutate

    rng = random.Random(seed)
    files = [f for d in ("assistant", "lsp", "tui", "kernels") for f in sorted((ROOT / d).glob("*.py"))]
    funcs = [fn for f in files for fn in extract_functions(f.read_text(encoding="utf-8"), str(f))
             if 4 <= fn.code.count("\n") <= 25]
    rng.shuffle(funcs)
    items: list[tuple[str, int | None]] = []
    it = iter(funcs)
    for fn in it:
        if len(items) >= n:
            break
        items.append((fn.code, None))
    for fn in it:
        if len(items) >= 2 * n:
            break
        m = mutate(fn.code, rng)
        if m is not None:
            items.append((m.code, m.line))
    engine = Engine(str(model_dir) if model_dir else None)
    reqs = [TaskRequest("debug", code, line=0) for code, _ in items]
    saved = tasks_mod.DEBUG_USE_GATE
    tasks_mod.DEBUG_USE_GATE = not legacy
    rows: list[tuple[bool, bool, bool, float]] = [(False, False, False, 0.0)] * len(reqs)
    t0 = time.perf_counter()
    for i, res in iter_batch(engine, reqs, batch_size=jobs):
        hint = res.hints[0] if getattr(res, "hints", None) else None
        bug_line = items[i][1]
        rows[i] = (bug_line is not None, hint is not None,
                   hint is not None and bug_line is not None and hint.line + 1 == bug_line,
                   hint.confidence if hint else 0.0)
    dt = time.perf_counter() - t0
    tasks_mod.DEBUG_USE_GATE = saved
    engine.close()
    n_clean = sum(1 for r in rows if not r[0])
    n_bug = len(rows) - n_clean
    kind = ("older answer-probability x surprisal-rank confidence" if legacy else
            f"gate confidence, threshold {tasks_mod.DEBUG_GATE_THRESHOLD:+.2f}")
    print(f"calibration [{_display(model_dir) if model_dir else 'shipped model'}; {kind}]: {n_clean} clean + "
          f"{n_bug} buggy held-out functions (seed {seed}) in {dt:.0f} s")
    for t in (0.0, 0.3, 0.4, 0.5, 0.6, 0.7):
        cf = sum(1 for b, f, _, c in rows if not b and f and c >= t) / max(1, n_clean)
        bf = sum(1 for b, f, _, c in rows if b and f and c >= t) / max(1, n_bug)
        br = sum(1 for b, _, r, c in rows if r and c >= t) / max(1, n_bug)
        print(f"  --min-confidence {t:.2f}: clean flagged {cf:4.0%} | buggy flagged {bf:4.0%}, "
              f"on the injected line {br:4.0%}")
    pos = [c for b, f, r, c in rows if r]
    neg = [c for b, f, r, c in rows if not b and f]
    if pos and neg:
        auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
        print(f"  confidence AUC, right-line hints vs hints on clean code: {auc:.2f} "
              f"({len(pos)} vs {len(neg)})")


def bench_repo_memory(root: str, model_dir: str | None, threads: int) -> None:
    """Completion memory (assistant/memory.py) of the project at ``root``: time to read it, its
    size, and the search that each completion token adds (median of 50, one query)."""
    import resource

    import torch

    from assistant import memory
    from model.checkpoint import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model_dir)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.monotonic()
    mem = memory.RepoMemory(loaded.model, loaded.tokenizer, root)
    build = time.monotonic() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q = torch.randn(1, loaded.model.cfg.dim)
    logits = torch.randn(1, loaded.model.cfg.vocab_size)
    times = []
    largest = int(torch.bincount(mem.fids).argmax()) if mem.entries else -1  # the largest file is edited
    rel = next((r for r, i in mem.file_ids.items() if i == largest), None)
    for _ in range(50):
        t = time.perf_counter()
        mem.mix(logits, q, exclude=rel)
        times.append(time.perf_counter() - t)
    print(f"repository memory of {root} ({len(mem.file_ids)} files), {threads} threads:")
    print(f"  read: {build:.1f} s for {mem.entries:,} positions ({mem.entries / build:,.0f} tokens/s)")
    print(f"  kept: {mem.keys.numel() * 4 / 2**20:.0f} MiB of {mem.keys.shape[1]}-d keys; peak RSS +{rss1 - rss0:.0f} MiB")
    how = (f"inverted-file index, {mem.centroids.shape[0]:,} cells, {memory.IVF_PROBE} searched"
           if mem.centroids is not None else "exact")
    print(f"  search + mix per generated token ({how}; {rel} left out): median "
          f"{1000 * statistics.median(times):.1f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m assistant.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="the model to benchmark besides the tiny one (default: shipped)")
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument("--budget", type=int, default=None, help="context budget (default: model context - 64)")
    p.add_argument("--jobs", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--skip-review", action="store_true")
    p.add_argument("--calibration", type=int, metavar="N", default=0,
                   help="debug-hint calibration of the shipped (or --model) model on N clean + N buggy "
                        "held-out functions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--legacy-confidence", action="store_true",
                   help="calibration with the older debug confidence (answer probability x surprisal rank)")
    p.add_argument("--random-preset", metavar="NAME",
                   help="also time review with a randomly initialised model of this preset (e.g. small, the "
                        "shipped architecture) and the shipped tokenizer: the worst case, every answer runs "
                        "to the token limit")
    p.add_argument("--review-path", metavar="DIR",
                   help="only time `moecoder review DIR --jobs N` end to end for each N of --review-jobs")
    p.add_argument("--review-jobs", default="1,2",
                   help="the --jobs values for --review-path (default 1,2; 'default': no --jobs, the review's defaults)")
    p.add_argument("--review-baseline", metavar="REV",
                   help="with --review-path: also run the review from git revision REV's tree (before/after in "
                        "one run, alternating) and compare the findings")
    p.add_argument("--review-rounds", type=int, default=1, metavar="N",
                   help="with --review-path: repeat the runs N times (the order reversed every other round)")
    p.add_argument("--loop-guard-check", type=int, metavar="N", default=0,
                   help="only compare the comment task without/with the repetition guard on N stdlib functions")
    p.add_argument("--review-memory", type=int, metavar="LINES", default=0,
                   help="only measure the review's peak RSS on one file of LINES lines (stand-in model)")
    p.add_argument("--repo-memory", metavar="DIR",
                   help="only time the completion memory of the project DIR (read, size, search per token)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for --repo-memory")
    args = p.parse_args(argv)
    if args.repo_memory:
        print(f"date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
        print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} (a shared box)")
        print(f"versions: {versions()}")
        bench_repo_memory(args.repo_memory, args.model, args.threads)
        return 0
    if args.loop_guard_check:
        print(f"date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
        print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} (a shared box)")
        print(f"versions: {versions()}")
        bench_loop_guard(args.loop_guard_check, args.max_tokens or 96)
        return 0
    if args.review_path or args.review_memory:
        print(f"date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
        print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} (a shared box)")
        print(f"versions: {versions()}")
        if args.review_memory:
            bench_review_memory(args.review_memory)
        if args.review_path:
            bench_review_path(args.review_path, [x.strip() for x in args.review_jobs.split(",")], args.model,
                              args.max_tokens, baseline=args.review_baseline, rounds=args.review_rounds)
        return 0

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"date: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    work = Path(tempfile.mkdtemp(prefix="moecoder-bench-"))
    tok, tok_path = tiny_tokenizer(work)
    bench_context(tok, args.lines, args.budget or 2048 - 64, "tiny tokenizer, vocab 512")
    shipped = shipped_dir(args.model)
    tok_dir = shipped
    if tok_dir is None:
        from model.checkpoint import default_model_dir

        tok_dir = Path(default_model_dir()) if (Path(default_model_dir()) / "tokenizer.model").exists() else None
    if tok_dir is not None:
        from model.tokenizer import Tokenizer

        stok = Tokenizer.load(tok_dir)
        bench_context(stok, args.lines, args.budget or 2048 - 64,
                      f"{_display(tok_dir)} tokenizer, vocab {stok.vocab_size}")
    if args.calibration:
        if shipped is None:
            print("calibration: needs a trained model (model/weights/ or --model DIR)")
        else:
            bench_calibration(args.calibration, args.seed, args.jobs, shipped if args.model else None,
                              legacy=args.legacy_confidence)
    if args.skip_review:
        return 0
    import dataclasses

    from model.checkpoint import export
    from model.config import get_preset
    from model.transformer import Transformer

    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=512)
    tiny_dir = work / "tiny"
    export(Transformer(cfg), cfg, tok_path, tiny_dir)
    bench_review(tiny_dir, "tiny preset, random weights", args.jobs, args.max_tokens)
    if args.random_preset:
        if tok_dir is None:
            print(f"review [random {args.random_preset}]: needs model/weights/tokenizer.model")
        else:
            from model.tokenizer import Tokenizer

            rtok = Tokenizer.load(tok_dir)
            torch.manual_seed(0)
            rcfg = dataclasses.replace(get_preset(args.random_preset), vocab_size=rtok.vocab_size)
            rdir = work / f"random-{args.random_preset}"
            tok_file = tok_dir / "tokenizer.model" if tok_dir.is_dir() else tok_dir
            export(Transformer(rcfg), rcfg, tok_file, rdir)
            bench_review(rdir, f"{args.random_preset} preset, random weights, shipped tokenizer", args.jobs,
                         args.max_tokens)
    if shipped is not None:
        bench_review(shipped, f"model {_display(shipped)}", args.jobs, args.max_tokens)
    else:
        print("review [shipped model]: not measured (no model/weights/config.json yet; pass --model DIR)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
