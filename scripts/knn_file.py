"""Experiment (issue #15): the edited file's own memory, outside the completion prompt's window.

    python scripts/knn_file.py --data /tmp/heldout [--limit 150] [--seed 0] [--lams 1] [--r0 0.4]

A completion prompt holds ~512 tokens around the cursor; in a longer file the rest is invisible
to the model. For each held-out FIM line (``moecoder eval --suite fim``'s items, the product's
prompt), the lines of the request's source (the line itself removed) that the prompt does not
contain are read into a memory (assistant/memory.py, as for a project), and the reference line's
tokens are scored teacher-forced after the prompt: the model alone vs mixed with that memory
(token top-1, NLL, lines whose every token is top-1). Lines of files that the prompt holds whole
count in both (no memory there).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def outside_prompt(lines: list[str], i: int, prompt: str) -> tuple[str, str]:
    """(text before, text after) the part of ``lines`` around line ``i`` that ``prompt`` contains."""
    a = i
    while a > 0 and "\n".join(lines[a - 1:i]) in prompt:
        a -= 1
    b = i + 1
    while b < len(lines) and "\n".join(lines[i + 1:b + 1]) in prompt:
        b += 1
    return "\n".join(lines[:a]), "\n".join(lines[b:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lams", default="1")
    ap.add_argument("--r0", type=float, default=0.4)
    ap.add_argument("--min-tokens", type=int, default=64, help="outside text shorter than this: no memory")
    ap.add_argument("--before-only", action="store_true",
                    help="only the text before the prompt's window (no entry whose context holds the line)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from knn_repo import score, teacher_forced  # scripts/ (this script's directory) is on the path

    from assistant import memory
    from assistant.config import Settings
    from assistant.engine import Engine
    from assistant.evaluate import completion_request, fim_items, heldout_sources
    from model.checkpoint import load_model

    memory.MemoryCache.for_memory = classmethod(lambda cls, model, root: None)  # nothing on disk
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    engine = Engine.from_loaded(loaded, **Settings().for_face("review").engine_options())
    sources, where = heldout_sources(args.data, args.limit, args.seed, tok)
    items = fim_items(sources, args.limit, args.seed, tok, 2048, 64)
    lams = [float(x) for x in args.lams.split(",")]
    stats = {lam: [0, 0.0, 0] for lam in [0.0, *lams]}
    ntok, with_mem, t0 = 0, 0, time.monotonic()
    for it in items:
        lines = it["source"].split("\n")
        req, ref = completion_request(lines, it["line"] - 1)
        plan, logits, h, y = teacher_forced(model, tok, engine, req, ref)
        ntok += len(y)
        before, after = outside_prompt(req.source.split("\n"), it["line"] - 1, tok.decode(plan.prompt_ids))
        if args.before_only:
            after = ""
        mem = None
        if len(tok.encode(before + after)) >= args.min_tokens:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "before.py").write_text(before)
                (Path(d) / "after.py").write_text(after)
                mem = memory.RepoMemory(model, tok, d)
            with_mem += 1
        for lam, s in stats.items():
            memory.LAM_MAX, memory.R0 = lam, args.r0
            score(s, mem.mix(logits, h).exp() if lam > 0 and mem is not None else logits.softmax(-1), y)
    print(f"{len(items)} FIM lines of {where} ({with_mem} with text outside the prompt), {ntok} tokens, "
          f"{time.monotonic() - t0:.0f}s", file=sys.stderr)
    for lam, (c, nll, whole) in stats.items():
        print(f"lam {lam:g} r0 {args.r0:g}: token top-1 {100 * c / ntok:.1f}% nll {nll / ntok:.3f} "
              f"lines all top-1 {100 * whole / len(items):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
