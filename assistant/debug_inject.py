"""Injected bugs in held-out packages, with their own doctest/test evidence (``python -m
assistant.debug_bench injected``).

Held-out packages (never in the training corpus; docs/model-card.md): ``jsonschema`` (functions
named by the package's own shipped tests, ``jsonschema/tests``; the default) and ``textual``
(functions whose own docstrings carry ``>>>`` examples; textual keeps most of its examples in
class docstrings, so few qualify). For
each function whose evidence passes untouched: the untouched function is debugged (a hint at
confidence >= 0.5 is a false alarm), then one bug is injected by the training-data injector
(:func:`model.data.tasks.mutate`, a different code path from the repair's mutations) and the
function is debugged again: top-1 localisation, verified repair, and whether the verified fix
restores the original line.
"""

from __future__ import annotations

import argparse
import random
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from assistant import debugging, evidence

ALARM = 0.5  # the review's default --min-confidence


def _site() -> Path:
    import jsonschema

    return Path(jsonschema.__file__).resolve().parents[1]


def _targets(packages: list[str]) -> list[tuple[evidence.Target, list[str]]]:
    sp = _site()
    out = []
    if "textual" in packages:
        for rel in ("textual/geometry.py", "textual/color.py", "textual/_slug.py"):
            src = (sp / rel).read_text(encoding="utf-8")
            tgt = evidence.Target(files={rel: src}, target=rel, module=evidence.module_name(rel), source=src)
            names = []
            from assistant import code as codemod

            for f in codemod.functions(src):
                ex = evidence.doctest_examples(src, f.qualname)
                if ex:
                    tgt.examples[f.qualname] = ex
                    tgt.tests[f.qualname] = []
                    names.append(f.qualname)
            out.append((tgt, names))
    if "jsonschema" in packages:
        files, _ = evidence.project_files(sp / "jsonschema")
        files = {f"jsonschema/{k}": v for k, v in files.items() if not k.startswith("benchmarks/")}
        for rel in ("jsonschema/_utils.py", "jsonschema/_types.py", "jsonschema/_format.py",
                    "jsonschema/exceptions.py", "jsonschema/_keywords.py", "jsonschema/validators.py",
                    "jsonschema/_legacy_keywords.py", "jsonschema/cli.py"):
            if not (sp / rel).is_file():
                continue
            src = (sp / rel).read_text(encoding="utf-8")
            tgt = evidence.Target(files=dict(files), target=rel, module=evidence.module_name(rel), source=src)
            tests = {k: v for k, v in files.items() if k.startswith("jsonschema/tests/")
                     and "test_jsonschema_test_suite" not in k}
            from assistant import code as codemod

            names = []
            for f in codemod.functions(src):
                if f.name.startswith("__"):
                    continue
                ids = evidence.tests_calling(sp, tests, tgt.module, f.qualname, limit=40)
                if ids:
                    tgt.tests[f.qualname] = ids
                    tgt.examples[f.qualname] = []
                    names.append(f.qualname)
            out.append((tgt, names))
    return out


def _inject(source: str, function: str, rng: random.Random) -> tuple[str, int, Any] | None:
    from model.data.tasks import mutate

    span = evidence.function_span(source, function)
    if span is None:
        return None
    lines = source.split("\n")
    fn_lines = lines[span[0] - 1: span[1]]
    indent = fn_lines[0][: len(fn_lines[0]) - len(fn_lines[0].lstrip())]
    code = textwrap.dedent("\n".join(fn_lines))
    m = mutate(code, rng)
    if m is None:
        return None
    new_fn = textwrap.indent(m.code, indent, lambda ln: bool(ln.strip())).split("\n")
    if len(new_fn) != len(fn_lines):
        return None
    bug = span[0] + m.line - 1
    return "\n".join(lines[: span[0] - 1] + new_fn + lines[span[1]:]), bug, m


def _with_source(tgt: evidence.Target, source: str) -> evidence.Target:
    t = evidence.Target(files={**tgt.files, tgt.target: source}, target=tgt.target, module=tgt.module,
                        source=source, examples=tgt.examples, tests=tgt.tests, pytest_args=tgt.pytest_args)
    return t


def run_injected(args: argparse.Namespace) -> dict:
    from assistant.debug_bench import _engine

    packages = [p for p in (args.packages or "jsonschema").split(",") if p]
    engine = _engine(args.model)
    opts = debugging.DebugOptions(budget_s=args.budget, per_run_timeout=args.per_run_timeout,
                                  use_model=engine is not None, top_lines=args.top_lines)
    rng = random.Random(0)
    rows = []
    jobs = [(tgt, n) for tgt, names in _targets(packages) for n in names][: args.limit]
    for i, (tgt, name) in enumerate(jobs):
        t0 = time.monotonic()
        clean_res, clean_rep = debugging.debug_function(engine, tgt, name, None, opts)
        row: dict[str, Any] = {"file": tgt.target, "function": name, "runs": len(clean_rep.evidence.runs),
                               "clean_failing": len(clean_rep.evidence.failing)}
        if not clean_rep.evidence.runs or clean_rep.evidence.failing:
            row["eligible"] = False
            rows.append(row)
            print(f"[{i + 1}/{len(jobs)}] {tgt.target}:{name}: skipped (runs={row['runs']}, failing untouched="
                  f"{row['clean_failing']})", file=sys.stderr, flush=True)
            continue
        row["eligible"] = True
        row["false_alarm"] = any(h.confidence >= ALARM for h in clean_res.hints)
        inj = _inject(tgt.source, name, rng)
        if inj is None:
            row["injected"] = False
            rows.append(row)
            continue
        bad_src, bug, m = inj
        row.update(injected=True, bug_line=bug, kind=m.kind, new_line=m.new_line.strip(), old_line=m.old_line.strip())
        res, rep = debugging.debug_function(engine, _with_source(tgt, bad_src), name, None, opts)
        h = res.hints[0] if res.hints else None
        row["detected"] = bool(rep.evidence.failing)
        row["mode"] = rep.mode
        row["top1"] = bool(h and h.line + 1 == bug)
        row["flagged"] = bool(h and h.confidence >= ALARM)
        row["verified"] = bool(h and h.evidence == "verified")
        row["fix"] = h.fix.strip() if h and h.fix else None
        row["restores_original"] = bool(row["verified"] and row["fix"] and
                                        "".join(row["fix"].split()) == "".join(m.old_line.split()))
        from assistant.localize import top1_credit

        row["top1_ochiai"] = round(top1_credit(rep.ranked_ochiai, {bug}), 3)
        row["top1_model"] = round(top1_credit(rep.ranked_model, {bug}), 3)
        row["top1_combined"] = round(top1_credit(rep.ranked, {bug}), 3)
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"[{i + 1}/{len(jobs)}] {tgt.target}:{name}: {m.kind} line {bug} detected={row['detected']} "
              f"top1={row['top1']} verified={row['verified']} fix={row['fix']!r} false_alarm={row['false_alarm']} "
              f"({row['seconds']}s)", file=sys.stderr, flush=True)
    el = [r for r in rows if r.get("eligible")]
    inj = [r for r in el if r.get("injected")]
    det = [r for r in inj if r.get("detected")]
    summary = {
        "functions": len(rows), "eligible": len(el), "injected": len(inj), "detected_by_evidence": len(det),
        "false_alarms_untouched": sum(r["false_alarm"] for r in el),
        "top1_all_injected": sum(r["top1"] for r in inj),
        "top1_detected": sum(r["top1"] for r in det),
        "top1_ochiai_detected": round(sum(r["top1_ochiai"] for r in det), 2),
        "top1_model_detected": round(sum(r["top1_model"] for r in det), 2),
        "top1_combined_detected": round(sum(r["top1_combined"] for r in det), 2),
        "verified": sum(r["verified"] for r in inj),
        "verified_restores_original": sum(r["restores_original"] for r in inj),
        "flagged_injected": sum(r["flagged"] for r in inj),
    }
    if engine is not None:
        engine.close()
    return {"suite": "injected", "packages": packages, "summary": summary, "rows": rows}
