"""Measure debugging from evidence (docs/benchmarks.md, "Debugging from evidence").

``python -m assistant.debug_bench quixbugs [--model DIR|shipped|none] [--limit N] [--json OUT]``
    QuixBugs (``../shared/eval/quixbugs``, measuring only): each buggy program with its own
    pytest file as the evidence. Localisation top-1 (the top line is a bug line; ties at the
    top share the credit) for Ochiai alone, the model alone and combined, and for the final
    answer (the verified fix's line when there is one); verified repairs; and the held-out
    check: every verified fixed program is run against the held-out half of the test cases
    (evidence gets the other half) and compared with the reference program
    (``correct_python_programs``) on all cases.
``python -m assistant.debug_bench injected [--model ...] [--packages N]``
    Functions of held-out packages (installed, not in the training corpus) with doctest
    examples: one bug injected per function (a mutation), evidence = its doctests;
    localisation and repair rates, and false alarms on the untouched functions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from assistant import debugging, evidence, localize


def _engine(model: str) -> Any:
    if model == "none":
        return None
    from assistant.engine import Engine

    return Engine(None if model == "shipped" else model)


def quixbugs_target(qb: Path, rec: dict, program: str, split: str = "all") -> evidence.Target:
    from assistant.evaluate import quixbugs_files

    name = rec["name"]
    files = quixbugs_files(qb, rec, program)
    tgt = evidence.Target(files=dict(files), target=f"python_programs/{name}.py", module=f"python_programs.{name}",
                          source=program)
    test = f"python_testcases/test_{name}.py"
    if split != "all" and rec.get("json_testcases"):
        cases = (qb / rec["json_testcases"]).read_text().splitlines()
        keep = [c for i, c in enumerate(cases) if c.strip() and (i % 2 == 0) == (split == "evidence")]
        if keep:
            tgt.files[rec["json_testcases"]] = "\n".join(keep) + "\n"
    tgt.tests[name] = [test]
    tgt.examples[name] = []
    return tgt


def run_quixbugs(args: argparse.Namespace) -> dict:
    from assistant.evaluate import _eval_dir, load_quixbugs, quixbugs_item, run_quixbugs_tests

    qb = _eval_dir(args.eval_dir) / "quixbugs"
    recs = load_quixbugs(_eval_dir(args.eval_dir))
    if args.only:
        want = set(args.only.split(","))
        unknown = sorted(want - {r["name"] for r in recs})
        if unknown:
            print(f"error: no QuixBugs program named {', '.join(unknown)}", file=sys.stderr)
            raise SystemExit(2)
        recs = [r for r in recs if r["name"] in want]
    recs = recs[: args.limit]
    engine = _engine(args.model)
    opts = debugging.DebugOptions(budget_s=args.budget, per_run_timeout=args.per_run_timeout,
                                  use_model=engine is not None, top_lines=args.top_lines)
    rows = []
    for i, rec in enumerate(recs):
        it = quixbugs_item(rec)
        program = "\n".join(it["lines"]) + "\n"
        tgt = quixbugs_target(qb, rec, program, split=args.split)
        name = rec["name"]
        t0 = time.monotonic()
        res, rep = debugging.debug_function(engine, tgt, name, None, opts)
        bug = set(it["bug_lines"])
        row = {"name": name, "bug_lines": sorted(bug), "runs": len(rep.evidence.runs),
               "failing": len(rep.evidence.failing), "mode": rep.mode, "tried": rep.tried,
               "seconds": round(time.monotonic() - t0, 1), "problems": rep.evidence.problems[:2]}
        for key, ranked in (("ochiai", rep.ranked_ochiai), ("model", rep.ranked_model), ("combined", rep.ranked),
                            ("final", rep.ranked_final or rep.ranked)):
            row[f"top1_{key}"] = round(localize.top1_credit(ranked, bug), 3)
        h = res.hints[0] if res.hints else None
        row["answer_line"] = h.line + 1 if h else None
        row["top1_answer"] = bool(h and h.line + 1 in bug)
        row["verified"] = bool(h and h.evidence == "verified")
        row["plausible"] = bool(h and h.evidence == "plausible")
        row["fix"] = h.fix.strip() if h and h.fix else None
        row["probe_inputs"] = rep.probe_inputs
        if rep.crashing:
            row["raising_fix"] = rep.crashing[0][0].text.strip()
        if row["verified"] or row["plausible"]:
            fixed = "\n".join(program.split("\n")[: h.line] + [h.fix] + program.split("\n")[h.line + 1:])
            row["fix_matches_reference"] = _same_as_reference(it, h)
            row["heldout_pass"] = run_quixbugs_tests(qb, rec, fixed, 60.0)
            if args.split == "evidence":
                held = quixbugs_target(qb, rec, fixed, split="heldout")
                ev = evidence.gather(held, name, timeout=60, per_run_timeout=2.0)
                row["heldout_half_pass"] = bool(ev.runs) and not ev.failing
        if rep.suspicious and not row["verified"]:
            # a fix that made every run pass but left reached lines unreached (not verified):
            # how it fares on the held-out cases says whether the check rejected an overfit
            c, lost = rep.suspicious[0]
            row["cut_out_fix"] = c.text.strip()
            row["cut_out_lines"] = lost
            cut = c.apply(program)
            row["cut_out_heldout_pass"] = run_quixbugs_tests(qb, rec, cut, 60.0)
            if args.split == "evidence":
                held = quixbugs_target(qb, rec, cut, split="heldout")
                ev = evidence.gather(held, name, timeout=60, per_run_timeout=2.0)
                row["cut_out_heldout_half_pass"] = bool(ev.runs) and not ev.failing
        rows.append(row)
        print(f"[{i + 1}/{len(recs)}] {name}: mode={row['mode']} top1={row['top1_answer']} "
              f"ochiai={row['top1_ochiai']} model={row['top1_model']} combined={row['top1_combined']} "
              f"verified={row['verified']} plausible={row['plausible']} heldout={row.get('heldout_pass')} "
              f"half={row.get('heldout_half_pass')} fix={row['fix']!r} "
              f"({row['seconds']}s, {row['tried']} tried)", file=sys.stderr, flush=True)
    n = len(rows)
    summary = {
        "n": n,
        "top1_ochiai": round(sum(r["top1_ochiai"] for r in rows), 2),
        "top1_model": round(sum(r["top1_model"] for r in rows), 2),
        "top1_combined": round(sum(r["top1_combined"] for r in rows), 2),
        "top1_with_candidates": round(sum(r["top1_final"] for r in rows), 2),
        "top1_answer": sum(r["top1_answer"] for r in rows),
        "verified": sum(r["verified"] for r in rows),
        "verified_failing_heldout": sum(1 for r in rows if r["verified"] and not r.get("heldout_pass")),
        "plausible": sum(r["plausible"] for r in rows),
        "plausible_failing_heldout": sum(1 for r in rows if r["plausible"] and not r.get("heldout_pass")),
        "not_verified_raising": sum(1 for r in rows if "raising_fix" in r and not r["verified"]),
        "verified_same_as_reference": sum(1 for r in rows if r.get("fix_matches_reference")),
        "with_failing_runs": sum(1 for r in rows if r["failing"]),
        "not_verified_cut_out": sum(1 for r in rows if "cut_out_fix" in r),
        "cut_out_failing_heldout": sum(1 for r in rows if "cut_out_fix" in r and not r["cut_out_heldout_pass"]),
        "seconds_median": sorted(r["seconds"] for r in rows)[n // 2] if n else 0,
    }
    if args.split == "evidence":
        summary["verified_failing_heldout_half"] = sum(1 for r in rows if r["verified"]
                                                       and not r.get("heldout_half_pass"))
        summary["plausible_failing_heldout_half"] = sum(1 for r in rows if r["plausible"]
                                                        and not r.get("heldout_half_pass"))
        summary["cut_out_failing_heldout_half"] = sum(1 for r in rows if "cut_out_fix" in r
                                                      and not r.get("cut_out_heldout_half_pass"))
    if engine is not None:
        engine.close()
    return {"suite": "quixbugs", "summary": summary, "rows": rows}


def _same_as_reference(it: dict, h: Any) -> bool:
    o = it["oracle"]
    return bool(o is not None and o.fix is not None and o.line == h.line + 1
                and "".join(o.fix.split()) == "".join((h.fix or "").split()))


def _meta(args: argparse.Namespace) -> dict:
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "model": args.model, "argv": sys.argv[1:]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m assistant.debug_bench")
    p.add_argument("suite", choices=["quixbugs", "injected"])
    p.add_argument("--model", default="shipped", help="model directory, 'shipped' or 'none' (evidence only)")
    p.add_argument("--eval-dir", default=None)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--budget", type=float, default=60.0, help="seconds per function")
    p.add_argument("--per-run-timeout", type=float, default=1.0)
    p.add_argument("--top-lines", type=int, default=5, help="lines to try fixes on")
    p.add_argument("--split", choices=["all", "evidence"], default="all",
                   help="quixbugs: 'evidence' = half the JSON cases as evidence, the other half held out")
    p.add_argument("--only", default="", help="quixbugs: comma-separated program names (default: all)")
    p.add_argument("--packages", default="", help="injected: comma-separated package names")
    p.add_argument("--json", default=None, help="write the full report here")
    args = p.parse_args(argv)
    if args.suite == "quixbugs":
        out = run_quixbugs(args)
    else:
        from assistant.debug_inject import run_injected

        out = run_injected(args)
    out["meta"] = _meta(args)
    print(json.dumps(out["summary"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
