#!/usr/bin/env python
"""Check the eval harness itself: score oracle answers (built from the references) through the suites.

    python scripts/eval_selfcheck.py [--task-data TASKS] [--eval-dir DIR] [--jobs N]

Every metric should come out at its ceiling (1.0, except where the data makes that impossible:
QuixBugs bugs that are a missing line cannot be repaired by a one-line replacement). A value below
the ceiling points at a bug in the harness, not in a model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from assistant import evaluate as E
from model.formats import format_finding, number_lines


class Oracle:
    def __init__(self) -> None:
        self.table: dict = {}

    def complete(self, prompts, stops, max_new_tokens):
        return [self.table[p] for p in prompts]

    def fim(self, pairs, max_new_tokens, spm=False):
        return [self.table[p] for p in pairs]

    def task(self, task, codes, max_new_tokens):
        return [self.table[c] for c in codes]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="eval_selfcheck.py", description=__doc__.split("\n")[0])
    p.add_argument("--task-data", default=None, help="task data directory (test.jsonl) for bugs/docstrings")
    p.add_argument("--eval-dir", default=None)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    ev = E._eval_dir(args.eval_dir)
    try:
        tasks = E.load_mbpp(ev)
        quix = E.load_quixbugs(ev)
    except E.EvalError as e:
        print(f"eval_selfcheck: error: {e}", file=sys.stderr)
        return 2
    o = Oracle()
    for t in tasks:
        built = E.mbpp_prompt(t)
        if built:
            o.table[built[0]] = built[1]
    for it in E.mbpp_infill_items(tasks, 0):
        o.table[(it["prefix"], it["suffix"])] = it["middle"].rstrip("\n")
    for r in quix:
        it = E.quixbugs_item(r)
        o.table[number_lines("\n".join(it["lines"]))] = ("", format_finding(it["oracle"]))
    suites = ["mbpp", "mbpp-infill", "quixbugs"]
    if args.task_data:
        path = Path(args.task_data) / "test.jsonl"
        if not path.is_file():
            print(f"eval_selfcheck: error: {path} not found", file=sys.stderr)
            return 2
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            o.table[r["code"]] = (r["reasoning"], r["answer"])
        suites += ["bugs", "docstrings"]
    ctx = E.Context(predictor=o, eval_dir=ev, jobs=args.jobs, timeout=10, task_data=args.task_data)
    for s in suites:
        t = time.monotonic()
        r = E.SUITE_FUNCS[s](ctx)
        r.pop("programs", None)
        r.pop("failed_ids", None)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        print(f"{s:12s} {time.monotonic() - t:6.1f}s {json.dumps(shown)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
