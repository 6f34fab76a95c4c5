"""``moecoder tune PATH --out DIR``: adapt the shipped model to one repository, on the CPU.

    moecoder tune PATH [--minutes 10] --out DIR [--model BASE] [--threads 2] [--seed 0]

* The Python files of PATH are split by file: a seeded tenth is held out for validation, the
  rest is trained on.
* Training examples are the product's own completion prompts: a random line of a training
  file is cut out after its indentation, the context manager builds the prompt around the
  cursor exactly as a completion does (half of them with repository context from PATH), and
  the model learns the whole prompt-plus-line sequence (the prompt's code is the repository's
  code too; the line is weighted more). A fresh AdamW, a short warmup, then a cosine fall to a
  tenth of the rate by the end of the time left for training (a constant rate overshot: 13.8% ->
  17.5% at step 173 and 10.0% at step 335 on textual, docs/benchmarks.md).
* Validation is what a user gets: single-line completions through ``assistant.tasks`` on a
  fixed sample of lines of the held-out files, exact match. It runs before training, every
  ``--eval-every`` seconds and at the end; the best model so far is kept in memory.
* It stops by time (``--minutes`` is the whole run, evaluations and export included) or on
  Ctrl-C, and writes the best model as a full model directory (int8, like the shipped one)
  that every face loads with ``--model DIR``, plus ``tune.json`` (before/after, files, steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class TuneError(Exception):
    """One-line usage error (exit 2)."""


@dataclass
class Split:
    train: list[tuple[str, str]]  # (relative path, text)
    valid: list[tuple[str, str]]


def split_files(root: Path, seed: int = 0, valid_share: float = 0.1, max_bytes: int = 200_000) -> Split:
    """The repository's Python files, a seeded ``valid_share`` of them held out (at least one)."""
    from assistant.repo import RepoIndex

    idx = RepoIndex(root)
    files = []
    for rel in idx.files():
        p = root / rel
        try:
            if p.stat().st_size > max_bytes:
                continue
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len([ln for ln in text.split("\n") if _good_line(ln)]) >= 3:
            files.append((rel, text))
    if len(files) < 2:
        raise TuneError(f"{root}: needs at least 2 Python files with code, found {len(files)}")
    rng = random.Random(seed)
    order = list(range(len(files)))
    rng.shuffle(order)
    k = max(1, round(len(files) * valid_share))
    held = set(order[:k])
    return Split([f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held])


def _good_line(ln: str) -> bool:
    s = ln.strip()
    return 4 <= len(s) <= 120 and not s.startswith("#")


def sample_lines(files: list[tuple[str, str]], n: int, seed: int) -> list[tuple[str, str, int]]:
    """``n`` (path, text, 0-based line) spread over ``files`` (seeded)."""
    rng = random.Random(seed)
    cands = [(p, t, [i for i, ln in enumerate(t.split("\n")[:-1]) if _good_line(ln)]) for p, t in files]
    cands = [c for c in cands if c[2]]
    out = []
    for k in range(n):
        p, t, ok = cands[k % len(cands)]
        out.append((p, t, rng.choice(ok)))
    return out


def _request(root: Path, path: str, text: str, line: int, repo: bool):
    from assistant.tasks import TaskRequest

    lines = text.split("\n")
    ln = lines[line]
    ind = ln[: len(ln) - len(ln.lstrip())]
    src = "\n".join([*lines[:line], ind, *lines[line + 1:]])
    req = TaskRequest("complete", src, path=str(root / path), line=line, column=len(ind),
                      repo=str(root) if repo else None, recent=[] if repo else None)
    return req, ln[len(ind):]


def exact_match_rate(engine, root: Path, items: list[tuple[str, str, int]], repo: bool, batch_size: int = 8) -> float:
    """Share of ``items`` whose line the product's completion reproduces exactly."""
    from assistant.tasks import iter_batch

    reqs, refs = [], []
    for p, t, i in items:
        r, ref = _request(root, p, t, i, repo)
        reqs.append(r)
        refs.append(ref)
    hits = 0
    for i, res in iter_batch(engine, reqs, batch_size=batch_size):
        text = getattr(res, "text", None)
        hits += text is not None and text.rstrip() == refs[i].rstrip()
    return hits / max(1, len(items))


def training_example(engine, root: Path, item: tuple[str, str, int], repo: bool) -> tuple[list[int], int] | None:
    """(token ids, index where the line starts) of one example, or None when it does not plan."""
    from assistant.tasks import make_plan

    req, ref = _request(root, *item, repo)
    try:
        plan = make_plan(engine, req)
    except Exception:  # noqa: BLE001 - a line the context manager cannot serve: skip it
        return None
    tok = engine.tokenizer
    # the prompt stops where the model starts writing: at the line start when the indentation is
    # healed (assistant.tasks.healing_text), so the target spells the indentation too
    target = tok.encode(plan.heal + ref + "\n") + [tok.eos_id]
    return plan.prompt_ids + target, len(plan.prompt_ids)


def time_decay(frac: float, floor: float = 0.1) -> float:
    """The learning rate's share at ``frac`` of the training time: cosine from 1 to ``floor``."""
    from model.train import cosine_decay

    return cosine_decay(frac, floor)


def _batch_loss(model, batch: list[tuple[list[int], int]], pad: int, line_weight: float = 4.0):
    import torch
    import torch.nn.functional as F

    T = max(len(ids) for ids, _ in batch)
    x = torch.full((len(batch), T), pad, dtype=torch.long)
    w = torch.zeros((len(batch), T - 1))
    for b, (ids, start) in enumerate(batch):
        x[b, : len(ids)] = torch.tensor(ids)
        w[b, : len(ids) - 1] = 1.0
        w[b, start - 1: len(ids) - 1] = line_weight  # predicting the line's tokens
    logits = model(x[:, :-1]).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
    return (ce * w.reshape(-1)).sum() / w.sum() + model.aux_loss()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecoder tune",
                                description="Adapt the model to one repository on the CPU (stops by time; keeps the best).")
    p.add_argument("path", help="the repository (a directory of Python files)")
    p.add_argument("--out", required=True, help="new model directory (load it with --model DIR)")
    p.add_argument("--model", default=None, help="the model to start from (default: the shipped model)")
    p.add_argument("--minutes", type=float, default=10.0, help="the whole run's budget, evaluations included")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what --minutes counts: wall time, or this process's CPU time / --threads (a shared, "
                        "busy machine: the minutes it would take on --threads free cores)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="cosine: the rate falls to a tenth by the end of the time budget's training part")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repo-context", type=float, default=0.5,
                   help="share of training prompts with repository context")
    p.add_argument("--eval-lines", type=int, default=40, help="held-out lines scored before/after")
    p.add_argument("--eval-every", type=float, default=240.0, help="seconds of training between evaluations")
    p.add_argument("--repo-eval", action="store_true", help="also score with repository context: the repository's memory, read again "
                        "with the current weights at each evaluation (minutes for a large project)")
    p.add_argument("--train-context", type=int, default=256,
                   help="prompt tokens of a training example (smaller = more steps per minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing model in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except TuneError as e:
        print(f"moecoder tune: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from assistant.config import Settings
    from assistant.engine import Engine, ModelBackend
    from model.checkpoint import CheckpointError, default_model_dir, export, load_model

    threads = max(1, args.threads)
    if args.clock == "cpu":  # this process's CPU time over its threads: a busy shared machine counts fairly
        def clock() -> float:
            return time.process_time() / threads
    else:
        clock = time.monotonic
    t0 = time.monotonic()
    c0 = clock()
    deadline = c0 + args.minutes * 60
    root = Path(args.path).resolve()
    if not root.is_dir():
        raise TuneError(f"{args.path} is not a directory")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise TuneError(f"{out} exists and is not empty (pass --force to replace a model there)")
    if args.minutes <= 0 or args.batch_size < 1 or args.eval_lines < 1 or args.lr <= 0:
        raise TuneError("--minutes, --batch-size, --eval-lines and --lr must be positive")
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    split = split_files(root, args.seed)
    try:
        loaded = load_model(args.model)
    except (CheckpointError, ValueError) as e:
        raise TuneError(str(e).splitlines()[0]) from None
    model, tok, cfg = loaded.model, loaded.tokenizer, loaded.config
    base_dir = Path(args.model) if args.model else default_model_dir()
    settings = Settings().for_face("lsp")
    engine = Engine.from_loaded(backend=ModelBackend(model, tok, cfg), **settings.engine_options())
    train_opts = {**settings.engine_options(), "completion_context_tokens": args.train_context}
    train_engine = Engine.from_loaded(backend=ModelBackend(model, tok, cfg), **train_opts)
    valid_items = sample_lines(split.valid, args.eval_lines, args.seed)
    rng = random.Random(args.seed + 1)
    print(f"tune {root}: {len(split.train)} training files, {len(split.valid)} held out "
          f"({args.eval_lines} lines scored); budget {args.minutes:g} min on {torch.get_num_threads()} threads",
          file=sys.stderr)

    def evaluate(label: str, repo: bool = False) -> tuple[float, float]:
        model.eval()
        te = time.monotonic()
        if repo:  # the repository's memory holds the model's reading of it: read again with these weights
            from assistant import memory

            memory.forget(model)
        plain = exact_match_rate(engine, root, valid_items, repo=False)
        with_repo = exact_match_rate(engine, root, valid_items, repo=True) if repo else float("nan")
        model.train()
        extra = f" (with repository context {100 * with_repo:.1f}%)" if repo else ""
        print(f"  {label}: exact match {100 * plain:.1f}%{extra} [{time.monotonic() - te:.0f}s]", file=sys.stderr)
        return plain, with_repo

    te = clock()
    before = evaluate("before", repo=args.repo_eval)
    eval_s = (clock() - te) / (2 if args.repo_eval else 1) + 1.0
    best_score, best_state, best_step = before[0], None, 0
    history = [{"step": 0, "exact_match": before[0]}]

    train_items = sample_lines(split.train, 100_000, args.seed + 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, 0.95), weight_decay=0.0)
    warmup = 10
    step, k, losses = 0, 0, []
    export_s = 3.0 + sum(p.numel() for p in model.parameters()) / 4e6  # write + reload
    last_eval = clock()
    interrupted = False
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("tuning"), BarColumn(), TextColumn("{task.description}"), TimeRemainingColumn(),
                        transient=True)
    model.train()
    try:
        with progress:
            bar = progress.add_task("", total=max(1.0, deadline - clock()))
            started = clock()
            step_s = None
            while True:
                now = clock()
                reserve = eval_s * (2 + (2 if args.repo_eval else 1)) + export_s + (step_s or 10.0)
                if now + reserve > deadline:
                    break
                if now - last_eval > args.eval_every and now + 5 * eval_s + export_s < deadline and step > 0:
                    score = evaluate(f"step {step}")
                    history.append({"step": step, "exact_match": score[0]})
                    if score[0] > best_score:
                        best_score, best_state, best_step = score[0], copy.deepcopy(model.state_dict()), step
                    last_eval = clock()
                ts = clock()
                batch = []
                while len(batch) < args.batch_size:
                    item = train_items[k % len(train_items)]
                    k += 1
                    ex = training_example(train_engine, root, item, rng.random() < args.repo_context)
                    if ex is not None:
                        batch.append(ex)
                for g in opt.param_groups:
                    g["lr"] = args.lr * min(1.0, (step + 1) / warmup) * (
                        time_decay((ts - started) / max(1.0, deadline - reserve - started))
                        if args.schedule == "cosine" else 1.0)
                loss = _batch_loss(model, batch, tok.eos_id)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                losses.append(float(loss.detach()))
                step_s = clock() - ts if step_s is None else 0.8 * step_s + 0.2 * (clock() - ts)
                recent = losses[-20:]
                progress.update(bar, completed=clock() - started,
                                description=f"step {step} loss {sum(recent) / len(recent):.3f} "
                                            f"best {100 * best_score:.1f}%")
    except KeyboardInterrupt:
        interrupted = True
        print("  interrupted: keeping the best model so far", file=sys.stderr)
    if not interrupted and step > 0 and history[-1]["step"] != step:
        score = evaluate(f"step {step}")
        history.append({"step": step, "exact_match": score[0]})
        if score[0] > best_score:
            best_score, best_state, best_step = score[0], copy.deepcopy(model.state_dict()), step
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    tmp = out.with_name(out.name + ".tmp-tune")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    export(model, cfg, base_dir / "tokenizer.model", tmp, int8=True)
    # what the user will load: the written (int8) model, scored again
    after_loaded = load_model(tmp)
    after_engine = Engine.from_loaded(backend=ModelBackend(after_loaded.model, tok, cfg), **settings.engine_options())
    after = (exact_match_rate(after_engine, root, valid_items, repo=False),
             exact_match_rate(after_engine, root, valid_items, repo=True) if args.repo_eval else float("nan"))
    meta = {"repository": str(root), "base_model": str(base_dir), "train_files": len(split.train),
            "valid_files": [p for p, _ in split.valid], "eval_lines": len(valid_items), "steps": step,
            "best_step": best_step, "examples": step * args.batch_size, "lr": args.lr, "schedule": args.schedule,
            "lr_end": opt.param_groups[0]["lr"],
            "batch_size": args.batch_size, "seconds": round(time.monotonic() - t0, 1), "clock": args.clock,
            "cpu_seconds": round(time.process_time(), 1), "interrupted": interrupted,
            "before": {"exact_match": before[0], "exact_match_repo": None if math.isnan(before[1]) else before[1]},
            "after": {"exact_match": after[0], "exact_match_repo": None if math.isnan(after[1]) else after[1]},
            "history": history}
    (tmp / "tune.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    size = (out / "model.safetensors").stat().st_size
    print(f"exact match on {len(valid_items)} held-out lines: before {100 * before[0]:.1f}% -> after "
          f"{100 * after[0]:.1f}%" + (f"; with repository context {100 * before[1]:.1f}% -> {100 * after[1]:.1f}%"
                                      if args.repo_eval else ""))
    print(f"wrote {out} ({size / 2**20:.1f} MiB, best at step {best_step} of {step}; "
          f"{time.monotonic() - t0:.0f}s); use it with --model {out}")
    if not math.isfinite(sum(losses[-5:]) if losses else 0.0):
        print("moecoder tune: warning: the loss is not finite; the model was not improved", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
