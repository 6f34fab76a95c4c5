"""Calibrate the debug task's decision on held-out code and measure it honestly.

    python scripts/calibrate_debug.py --tasks TASKS.jsonl [--calib-packages textual]
        [--per-group 600] [--repo 150] [--device cuda] [--jobs 64] [--target-fa 0.08]
        [--records OUT.jsonl] [--from-records OUT.jsonl]

Data: debug examples of a task-data JSONL (``moecoder data tasks`` ``{split}.jsonl``: fields task,
code (numbered), answer, line, path) built from packages the model never saw, split by top-level
package (from ``path``) into a *calibration* group (``--calib-packages``) and a *test* group (all
the other packages); plus this repository's own functions (``--repo N``: N untouched + N with one
injected bug, ``model.data.tasks.mutate``), a second test group. Every function runs the real
``debug`` path (``assistant.tasks.make_plan`` -> batched greedy generation -> the consistency
checks); for each we record the gate score (``assistant.tasks.debug_gate_score``: log P("Line") -
log P("Takes") at the first reasoning token), the checked answer and the older confidence.

The threshold (``DEBUG_GATE_THRESHOLD``) is chosen on the calibration group only: the lowest gate
threshold whose share of flagged clean functions is <= ``--target-fa``. Then the false-alarm rate
on clean functions and the recall (any hint) / localisation (hint on the injected line) on buggy
ones are reported on every group, before (older confidence, ``--min-confidence`` 0.5 and 0) and
after (the gate), at the review's default ``--min-confidence`` 0.5.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_NUM = re.compile(r"^\d+\| ?")


def unnumber(code: str) -> str:
    return "\n".join(_NUM.sub("", ln, count=1) for ln in code.split("\n"))


def top_package(path: str) -> str:
    m = re.search(r"site-packages/([^/]+)", path)
    return m.group(1) if m else "other"


def load_items(tasks: Path, calib: set[str], per_group: int, repo: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = [json.loads(ln) for ln in tasks.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("task") == "debug"]
    items: list[dict] = []
    for group in ("calib", "test"):
        for want_bug in (False, True):
            pool = [r for r in rows if (top_package(r.get("path", "")) in calib) == (group == "calib")
                    and (r["answer"].strip() != "no issue") == want_bug]
            rng.shuffle(pool)
            for r in pool[:per_group]:
                items.append({"group": group, "package": top_package(r.get("path", "")),
                              "source": unnumber(r["code"]), "bug_line": r.get("line") if want_bug else None})
    if repo:
        from model.data.tasks import extract_functions, mutate

        funcs = [(d, fn) for d in ("assistant", "lsp", "tui", "kernels") for f in sorted((ROOT / d).glob("*.py"))
                 for fn in extract_functions(f.read_text(encoding="utf-8"), str(f)) if 4 <= fn.code.count("\n") <= 25]
        rng.shuffle(funcs)
        for d, fn in funcs[:repo]:  # each function untouched and with one injected bug
            items.append({"group": "repo", "package": f"repo/{d}", "source": fn.code, "bug_line": None})
            m = mutate(fn.code, rng)
            if m is not None:
                items.append({"group": "repo", "package": f"repo/{d}", "source": m.code, "bug_line": m.line})
    return items


def gate_scores(engine, prompts: list[list[int]], batch: int) -> list[float]:
    """The gate score of each prompt; batched with right padding (causal: the last real
    position does not see the padding)."""
    import torch

    from assistant.tasks import DEBUG_BUG_START, DEBUG_CLEAN_START

    model = engine.backend.model
    tok = engine.tokenizer
    bug_id, clean_id = tok.encode(DEBUG_BUG_START)[0], tok.encode(DEBUG_CLEAN_START)[0]
    dev = model.tok_emb.weight.device
    out = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.no_grad():
        for a in range(0, len(order), batch):
            idx = order[a:a + batch]
            t = max(len(prompts[i]) for i in idx)
            x = torch.full((len(idx), t), tok.pad_id, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, :len(prompts[i])] = torch.tensor(prompts[i])
            logits = model(x.to(dev))
            last = torch.tensor([len(prompts[i]) - 1 for i in idx], device=dev)
            lp = logits[torch.arange(len(idx), device=dev), last].float().log_softmax(-1)
            for r, i in enumerate(idx):
                out[i] = float(lp[r, bug_id] - lp[r, clean_id])
    return out


def collect(items: list[dict], model_dir: str | None, device: str, jobs: int) -> list[dict]:
    from assistant import tasks as T
    from assistant.engine import Engine

    engine = Engine(model_dir, device=device)
    plans, keep = [], []
    for it in items:
        try:
            plan = T.make_plan(engine, T.TaskRequest("debug", it["source"], line=0))
        except T.TaskError:
            continue
        if plan.notes:  # the code did not fit the prompt whole
            continue
        plans.append(plan)
        keep.append(it)
    t0 = time.perf_counter()
    scores = engine.submit(lambda: gate_scores(engine, [p.prompt_ids for p in plans], jobs))
    print(f"gate scores: {len(plans)} prompts in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    tok = engine.tokenizer
    p0 = plans[0]
    params = engine.sampling_params(p0.max_new_tokens, None, stop_strings=p0.stop_strings,
                                    stop_token_ids=p0.stop_token_ids)
    order = sorted(range(len(plans)), key=lambda i: len(plans[i].prompt_ids))
    gens: list = [None] * len(plans)
    t0 = time.perf_counter()
    for a in range(0, len(order), jobs):
        idx = order[a:a + jobs]
        outs = engine.submit(lambda idx=idx: engine.backend.generate_batch([plans[i].prompt_ids for i in idx], params))
        for i, o in zip(idx, outs):
            gens[i] = T.split_generation(tok, o.token_ids, o.logprobs, True)
        print(f"generated {min(a + jobs, len(order))}/{len(order)} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
    records = []
    for it, gen, s in zip(keep, gens, scores):
        src_lines = it["source"].split("\n")
        code_lines = src_lines  # top-level function or snippet starting at line 0, whole (no notes)
        checked = T.check_debug_answer(gen.answer, 0, code_lines, src_lines)
        rec = {"group": it["group"], "package": it["package"], "bug_line": it["bug_line"], "gate": s,
               "reasoning_start": gen.reasoning[:12], "answer": gen.answer[:200], "hint_line": None,
               "factor": None, "legacy": None}
        if checked is not None:
            rec["hint_line"] = checked.n
            rec["factor"] = checked.factor
            rank = engine.submit(lambda c=checked, cl=code_lines: T.surprisal_rank(engine, cl, c.n))
            rec["rank"] = rank
            lps = gen.answer_logprobs
            rec["answer_lp"] = sum(lps) / len(lps) if lps else None
            rec["legacy"] = T.calibrate(lps, rank) * checked.factor
        records.append(rec)
    engine.close()
    return records


def gate_conf(r: dict, t: float, factors: bool, w: float = 0.0) -> float:
    """The confidence ``assistant.tasks`` gives a hint: sigmoid(score - t + w (rank - 1/2)) x factor."""
    z = r["gate"] - t + (w * ((r.get("rank") if r.get("rank") is not None else 0.5) - 0.5) if w else 0.0)
    z = max(-50.0, min(50.0, z))
    c = 1.0 / (1.0 + math.exp(-z))
    return c * (r["factor"] if factors else 1.0)


def rates(recs: list[dict], conf) -> tuple[float, float, float, int, int]:
    """(false alarms on clean, buggy flagged, hint on the injected line, n clean, n buggy) where
    a function is flagged when it has a hint with ``conf(r) >= 0.5``."""
    clean = [r for r in recs if r["bug_line"] is None]
    bug = [r for r in recs if r["bug_line"] is not None]
    flag = [r for r in recs if r["hint_line"] is not None and conf(r) >= 0.5 - 1e-9]
    fa = sum(1 for r in flag if r["bug_line"] is None) / max(1, len(clean))
    rec = sum(1 for r in flag if r["bug_line"] is not None) / max(1, len(bug))
    loc = sum(1 for r in flag if r["bug_line"] is not None and r["hint_line"] == r["bug_line"]) / max(1, len(bug))
    return fa, rec, loc, len(clean), len(bug)


def choose_threshold(recs: list[dict], target: float, factors: bool, w: float = 0.0) -> float:
    """The lowest threshold (0.05 steps) whose false-alarm rate is <= target on every
    calibration package of ``recs`` separately (the worst package sets it: the model's bias
    differs between code bases)."""
    best = -10.0
    for pkg in sorted({r["package"] for r in recs}):
        sub = [r for r in recs if r["package"] == pkg]
        for k in range(-200, 401):
            t = k * 0.05
            if rates(sub, lambda r, t=t: gate_conf(r, t, factors, w))[0] <= target:
                break
        best = max(best, t)
    return round(best, 2)


def report(records: list[dict], target: float, calib_packages: set[str]) -> dict:
    def group(r: dict) -> str:
        if r["package"] in calib_packages:
            return "calib"
        return "repo" if r["package"].startswith("repo/") else "test"

    groups = {g: [r for r in records if group(r) == g] for g in ("calib", "test", "repo")}
    groups = {g: v for g, v in groups.items() if v}
    if "calib" not in groups:
        return {"text": ["no calibration records (see --calib-packages); analyse saved records with --from-records"]}
    calib = groups["calib"]
    out: dict = {"target_fa": target, "variants": {}}
    lines = []
    for name, factors, w in (("gate x factors", True, 0.0), ("gate", False, 0.0),
                             ("gate + 1 x rank, x factors", True, 1.0), ("gate + 2 x rank, x factors", True, 2.0)):
        t = choose_threshold(calib, target, factors, w)
        out["variants"][name] = {"threshold": t, "factors": factors, "rank_weight": w}
        for g, recs in groups.items():
            fa, rc, lc, nc, nb = rates(recs, lambda r, t=t, f=factors, w=w: gate_conf(r, t, f, w))
            out["variants"][name][g] = {"false_alarms": fa, "recall": rc, "localised": lc, "clean": nc, "buggy": nb}
            lines.append(f"after  [{name}, threshold {t:+.2f}] {g:5s}: clean flagged {fa:5.1%} ({nc}) | buggy "
                         f"flagged {rc:5.1%}, on the injected line {lc:5.1%} ({nb})")
    for mc in (0.0, 0.5):
        out[f"before@{mc}"] = {}
        for g, recs in groups.items():
            fa, rc, lc, nc, nb = rates(recs, lambda r, mc=mc: (r["legacy"] or 0.0) + 0.5 - mc)
            out[f"before@{mc}"][g] = {"false_alarms": fa, "recall": rc, "localised": lc, "clean": nc, "buggy": nb}
            lines.append(f"before [older confidence, --min-confidence {mc}] {g:5s}: clean flagged {fa:5.1%} | "
                         f"buggy flagged {rc:5.1%}, on the injected line {lc:5.1%}")
    # the gate as a classifier on its own (clean vs buggy), and the sweep on the test groups
    for g, recs in groups.items():
        pos = [r["gate"] for r in recs if r["bug_line"] is not None]
        neg = [r["gate"] for r in recs if r["bug_line"] is None]
        if pos and neg:
            auc = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
            out.setdefault("gate_auc", {})[g] = auc
            lines.append(f"gate AUC (buggy vs clean) {g}: {auc:.3f}")
        gen_flag = sum(1 for r in recs if r["bug_line"] is None and r["hint_line"] is not None) / max(1, len(neg))
        lines.append(f"generated answer alone flags {gen_flag:5.1%} of clean {g} functions")
    for g, recs in groups.items():
        row = []
        for t in (0.0, 1.0, 2.0, 3.0, 4.0):
            fa, rc, lc, _, _ = rates(recs, lambda r, t=t: gate_conf(r, t, True))
            row.append(f"t={t:+.0f}: {fa:.0%}/{rc:.0%}/{lc:.0%}")
        lines.append(f"sweep {g} (clean flagged/buggy flagged/localised, gate x factors): " + "  ".join(row))
    out["text"] = lines
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/calibrate_debug.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=Path, help="task-data JSONL with debug examples from held-out packages")
    p.add_argument("--calib-packages", default="textual",
                   help="comma-separated top-level packages for calibration (repo/assistant etc. for this repository's "
                        "directories); every other package is test data")
    p.add_argument("--per-group", type=int, default=600, help="clean and buggy functions per group (each)")
    p.add_argument("--repo", type=int, default=400,
                   help="this repository's functions (5-26 lines): up to N, each untouched and with one injected bug")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=16, help="prompts per batch")
    p.add_argument("--target-fa", type=float, default=0.08, help="false-alarm rate to calibrate for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", type=Path, help="write the per-function records here (JSONL)")
    p.add_argument("--from-records", type=Path, help="skip the model: analyse saved records")
    p.add_argument("--json", type=Path, help="write the summary here")
    args = p.parse_args(argv)
    if args.from_records:
        try:
            records = [json.loads(ln) for ln in args.from_records.read_text().splitlines() if ln.strip()]
        except (OSError, ValueError) as e:
            print(f"error: cannot read {args.from_records}: {e}", file=sys.stderr)
            return 2
    else:
        if not args.tasks or not args.tasks.is_file():
            print("error: --tasks FILE.jsonl is required (or --from-records)", file=sys.stderr)
            return 2
        calib = {s.strip() for s in args.calib_packages.split(",") if s.strip()}
        items = load_items(args.tasks, calib, args.per_group, args.repo, args.seed)
        print(f"{len(items)} functions", file=sys.stderr)
        records = collect(items, args.model, args.device, args.jobs)
        if args.records:
            args.records.write_text("".join(json.dumps(r) + "\n" for r in records))
    calib_set = {s.strip() for s in args.calib_packages.split(",") if s.strip()}
    summary = report(records, args.target_fa, calib_set)
    summary["calib_packages"] = sorted(calib_set)
    print("\n".join(summary["text"]))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
