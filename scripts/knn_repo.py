"""Experiment (issue #15): settings of the repository memory (assistant/memory.py) on repo-fim lines.

    python scripts/knn_repo.py ROOT[,ROOT...] [--limit 60] [--lams 0,0.5] [--taus 0.1] [--r0 0.4]
                               [--k 32] [--dims 128] [--stubs] [--teacher [--buckets N]] [--ivf-min N]

Each setting sets the memory's constants (``LAM_MAX``; ``R0``, 0 = a fixed lam; ``TAU``; ``K``;
``PCA_DIMS``) and either runs the product's completions of the ``repo-fim`` suite's lines of ROOT
(exact match / edit similarity; lam 0 = without the memory), or, with ``--teacher``, scores the
reference line's tokens after the product's prompt (top-1 accuracy, negative log-likelihood, lines
whose every token is top-1). ``--stubs``: the signature stubs in the prompt too.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch


def _settings(args) -> list[tuple[float, float]]:
    out = []
    for lam in map(float, args.lams.split(",")):
        for tau in map(float, args.taus.split(",") if lam > 0 else ["1"]):  # lam 0: once
            out.append((lam, tau))
    return out


def _set(memory, lam: float, tau: float, args) -> None:
    memory.LAM_MAX, memory.TAU, memory.K = lam, tau, args.k
    memory.R0 = args.r0 if args.r0 > 0 else math.inf  # inf: lam = LAM_MAX everywhere


def teacher_forced(model, tok, engine, req, ref):
    """(plan, logits, head inputs, target ids) of the reference line's tokens after the product's prompt."""
    from assistant.tasks import make_plan

    plan = make_plan(engine, req)
    target = tok.encode(plan.heal + ref + "\n")
    x = torch.tensor([(plan.prompt_ids + target)[:-1]])
    start = len(plan.prompt_ids) - 1
    with torch.inference_mode():
        logits = model(x)[0, start:]
        h = model(x, head=False)[0, start:]
    return plan, logits, h, torch.tensor(target)


def score(s: list, p, y) -> None:
    """Add to ``s`` = [correct tokens, NLL, whole lines] the scores of probabilities ``p`` [T, V] for targets ``y``."""
    ok = p.argmax(-1) == y
    s[0] += int(ok.sum())
    s[1] += float(-p.gather(1, y[:, None]).clamp_min(1e-30).log().sum())
    s[2] += bool(ok.all())


def teacher(model, tok, engine, mems, items, args) -> int:
    from assistant import memory

    stats = {s: [0, 0.0, 0] for s in _settings(args)}  # correct tokens, nll, whole lines
    rows, ntok = [], 0  # buckets: (r, the memory's top-1 right, the model's top-1 right)
    for it, req, ref in items:
        _, logits, h, y = teacher_forced(model, tok, engine, req, ref)
        mem = mems[it["root"]]
        ntok += len(y)
        for (lam, tau), s in stats.items():
            _set(memory, lam, tau, args)
            score(s, mem.mix(logits, h, it["path"]).exp() if lam > 0 else logits.softmax(-1), y)
        if args.buckets:
            _set(memory, 1.0, 0.1, argparse.Namespace(k=args.k, r0=0))
            d, v, _, qq = mem.nearest(h, it["path"], with_norm=True)
            w = torch.softmax(-d / (0.1 * d[:, :1].clamp_min(1e-6)), dim=-1)
            p_knn = torch.zeros_like(logits).scatter_add_(1, v.clamp_max(logits.shape[-1] - 1), w)
            r = d[:, 0] / qq[:, 0]
            rows.extend(zip(r.tolist(), (p_knn.argmax(-1) == y).tolist(), (logits.argmax(-1) == y).tolist()))
    if rows:
        rows.sort()
        q = len(rows) // args.buckets
        for b in range(args.buckets):
            part = rows[b * q:(b + 1) * q if b < args.buckets - 1 else len(rows)]
            print(f"relative nearest distance {part[0][0]:.3f}-{part[-1][0]:.3f}: memory top-1 "
                  f"{100 * sum(x[1] for x in part) / len(part):.0f}%, model top-1 "
                  f"{100 * sum(x[2] for x in part) / len(part):.0f}%")
    for (lam, tau), (c, nll, lines) in stats.items():
        print(f"lam {lam:g} tau {tau:g} r0 {args.r0:g} k {args.k} dims {args.dims}: token top-1 {100 * c / ntok:.1f}% "
              f"nll {nll / ntok:.3f} lines all top-1 {100 * lines / len(items):.1f}% ({len(items)} lines, {ntok} tokens)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("roots")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lams", default="0,0.5", help="LAM_MAX values (0: without the memory)")
    ap.add_argument("--taus", default="0.1")
    ap.add_argument("--r0", type=float, default=0.0, help="lam = LAM_MAX exp(-r / r0) (0: a fixed lam)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dims", type=int, default=128, help="PCA_DIMS (the model's width: no projection)")
    ap.add_argument("--stubs", action="store_true", help="also the repository stubs in the prompt")
    ap.add_argument("--teacher", action="store_true",
                    help="token-level: the reference line's tokens after the product's prompt, every setting")
    ap.add_argument("--buckets", type=int, default=0, help="teacher: accuracy by nearest distance, in N buckets")
    ap.add_argument("--ivf-min", type=int, default=0,
                    help="IVF_MIN: entries from which the search goes through the k-means cells (0: the product's)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import assistant.tasks
    from assistant import memory
    from assistant.config import Settings
    from assistant.engine import Engine
    from assistant.evaluate import _text, completion_request, edit_similarity, exact_match, repo_fim_items
    from assistant.tasks import iter_batch
    from model.checkpoint import load_model

    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    engine = Engine.from_loaded(loaded, **Settings().for_face("review").engine_options())
    memory.PCA_DIMS = args.dims
    if args.ivf_min:
        memory.IVF_MIN = args.ivf_min
    roots = [Path(r) for r in args.roots.split(",") if r]
    mems = {}
    for r in roots:
        t = time.monotonic()
        mems[str(r)] = memory.memory_for(model, tok, r, quiet=True)  # the one the product's completions use
        print(f"memory {r}: {mems[str(r)].entries:,} positions, {len(mems[str(r)].file_ids)} files, "
              f"{time.monotonic() - t:.0f}s", file=sys.stderr)
    assistant.tasks.REPO_STUBS_WITH_MEMORY = args.stubs
    items = []
    for it in repo_fim_items(roots, args.limit, args.seed):
        text = (Path(it["root"]) / it["path"]).read_text(encoding="utf-8")
        req, ref = completion_request(text.split("\n"), it["line"], path=str(Path(it["root"]) / it["path"]))
        items.append((it, req, ref))
    if args.teacher:
        assistant.tasks.REPO_MEMORY = False  # the plan gives the prompt; the memory is applied here
        for it, req, _ in items:
            req.repo, req.recent = (it["root"], []) if args.stubs else (None, None)
        return teacher(model, tok, engine, mems, items, args)
    for lam, tau in _settings(args):
        _set(memory, lam, tau, args)
        assistant.tasks.REPO_MEMORY = lam > 0
        t = time.monotonic()
        em = es = 0.0
        outs = []
        for it, req, ref in items:
            req.repo, req.recent = (it["root"], []) if lam > 0 or args.stubs else (None, None)
            res = [r for _, r in iter_batch(engine, [req], batch_size=1)][0]
            p = _text(res) or ""
            em += exact_match(p, ref)
            es += edit_similarity(p, ref)
            outs.append((ref, p))
        n = len(items)
        print(f"lam {lam:g} tau {tau:g} r0 {args.r0:g} k {args.k} dims {args.dims}: exact match {100 * em / n:.1f}% "
              f"edit sim {es / n:.3f} ({n} lines, {time.monotonic() - t:.0f}s)", flush=True)
        for ref, p in outs[:8]:
            print(f"    ref {ref!r:60.60} got {p!r:60.60}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
