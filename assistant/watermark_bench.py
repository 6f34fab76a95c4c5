"""Watermark strength and cost on the shipped model: ``python -m assistant.watermark_bench``.

Strength: held-out function-body completions (prompt = the file up to a function's
signature and docstring, from packages the model never saw: ``--data`` is a corpus built
with ``moecoder data corpus ... --splits 0,0,1``), sampled at ``--temperature`` with and
without the watermark (same seeds). Each text is scored by the detector with every entropy
filter (none / rule / model); its first L re-tokenised tokens give the "length L" rows.
Negatives: the unwatermarked generations and the human-written bodies of the same
functions. Robustness: the watermarked texts after renaming every identifier and after
deleting 20% of lines. Cost: MBPP single-line infill (SPM, exact match + tests pass) and
MBPP pass@1 from ``../shared/eval`` (measuring only) with and without the watermark at the
same settings, and decode ms/token with and without (interleaved, same prompts).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import datetime as _dt
import json
import keyword
import math
import platform
import random
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

LENGTHS = (32, 64, 128, 256)
MODES = ("none", "rule", "model")


def _log(msg: str) -> None:
    print(f"[{_dt.datetime.now(_dt.UTC).strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- prompts
def body_items(sources: list[tuple[str, str]], tok, n: int, seed: int, min_body_tokens: int = 64,
               prompt_tokens: int = 384) -> list[dict]:
    """Functions with a body of >= ``min_body_tokens`` tokens: prompt = file up to the body
    (signature + docstring), reference = the human-written body."""
    rng = random.Random(seed)
    cands = []
    for path, text in sources:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.split("\n")
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
                continue
            first = node.body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                and isinstance(first.value.value, str)
            start = node.body[1] if has_doc else first
            if start.lineno <= node.lineno:  # one-line def
                continue
            prompt = "\n".join(lines[: start.lineno - 1]) + "\n"
            body = "\n".join(lines[start.lineno - 1: node.end_lineno]) + "\n"
            cands.append((path, node.name, prompt, body))
    rng.shuffle(cands)
    out, per_file = [], {}
    for path, name, prompt, body in cands:
        if per_file.get(path, 0) >= 2:
            continue
        if len(tok.encode(body)) < min_body_tokens:
            continue
        ids = tok.encode(prompt)[-prompt_tokens:]
        out.append({"path": path, "function": name, "prompt_ids": [tok.eos_id, *ids], "body": body})
        per_file[path] = per_file.get(path, 0) + 1
        if len(out) >= n:
            break
    return out


# --------------------------------------------------------------------------- edits
_NAME = re.compile(r"[A-Za-z_]\w*")


def rename_identifiers(code: str) -> str:
    """Every identifier that is not a keyword, a builtin or an attribute (after '.') becomes
    ``v1``, ``v2``, ... consistently; strings and comments are left alone (tokenize)."""
    import io
    import tokenize

    keep = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins)) | {"self", "cls"}
    spans = []
    prev = None
    try:
        for t in tokenize.generate_tokens(io.StringIO(code).readline):
            if t.type == tokenize.NAME and t.string not in keep and not (prev is not None and prev.string == "."):
                spans.append((t.start, t.end, t.string))
            if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
                prev = t
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # a cut-off generation: rename what was tokenised
    names: dict[str, str] = {}
    for _, _, s in spans:  # v1, v2, ... in order of first appearance
        names.setdefault(s, f"v{len(names) + 1}")
    lines = code.split("\n")
    for (r0, c0), (r1, c1), s in reversed(spans):
        if r0 == r1:
            line = lines[r0 - 1]
            lines[r0 - 1] = line[:c0] + names[s] + line[c1:]
    return "\n".join(lines)


def delete_lines(code: str, frac: float, seed: int) -> str:
    lines = code.split("\n")
    idx = [i for i, s in enumerate(lines) if s.strip()]
    k = round(frac * len(idx))
    drop = set(random.Random(seed).sample(idx, k)) if k else set()
    return "\n".join(s for i, s in enumerate(lines) if i not in drop)


# --------------------------------------------------------------------------- generation
def _generate(loaded, prompts, params, batch):
    from model.generate import generate_batch

    t = time.perf_counter()
    res = generate_batch(loaded.model, loaded.tokenizer, prompts, params, batch_size=batch)
    return res, time.perf_counter() - t


def _gen_ids(r, tok) -> list[int]:
    return [t for t in r.token_ids if t != tok.eos_id]


def run_strength(loaded, items, args, wm, log=_log) -> tuple[dict, dict]:
    import torch

    from model.generate import SamplingParams
    from model.watermark import Detector, Watermark, decide

    tok = loaded.tokenizer
    texts: dict[str, list[str]] = {"wm": [], "plain": [], "human": [it["body"] for it in items]}
    timing = {"wm": [0.0, 0], "plain": [0.0, 0]}
    for a in range(0, len(items), args.batch):
        chunk = [it["prompt_ids"] for it in items[a:a + args.batch]]
        order = ("plain", "wm") if (a // args.batch) % 2 == 0 else ("wm", "plain")
        for arm in order:  # interleaved: load drifts affect both arms alike
            p = SamplingParams(max_new_tokens=args.max_new, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed + a, watermark=wm if arm == "wm" else None)
            res, dt = _generate(loaded, chunk, p, args.batch)
            timing[arm][0] += dt
            timing[arm][1] += sum(len(r.token_ids) for r in res)
            texts[arm] += [tok.decode(_gen_ids(r, tok)) for r in res]
        log(f"strength: generated {min(a + args.batch, len(items))}/{len(items)} prompts x 2 arms")
    rng = random.Random(args.seed)
    texts["wm_renamed"] = [rename_identifiers(t) for t in texts["wm"]]
    texts["wm_deleted20"] = [delete_lines(t, 0.2, rng.randrange(1 << 30)) for t in texts["wm"]]
    det = Detector(wm, tok, loaded.model, entropy="model", min_entropy=args.min_entropy,
                   min_tokens=args.min_tokens, alpha=args.alpha)
    wrong = Watermark(wm.key + "-wrong", context=wm.context, layers=wm.layers)
    scored: dict[str, list] = {}
    for name, ts in texts.items():
        scored[name] = [det.token_scores(t) for t in ts]
        log(f"strength: scored {name} ({len(ts)} texts)")
    wrong_det = Detector(wrong, tok, None, entropy="none")
    scored["wm_wrong_key"] = []
    for t, base in zip(texts["wm"], scored["wm"]):
        ts = wrong_det.token_scores(t)
        ts.trivial, ts.entropy = base.trivial, base.entropy  # same tokens, same positions
        scored["wm_wrong_key"].append(ts)
    n_tok = {name: [len(tok.encode(t)) for t in ts] for name, ts in texts.items()}
    n_tok["wm_wrong_key"] = n_tok["wm"]
    out: dict = {"n_prompts": len(items), "by_length": {}, "edits": {}, "examples": {}}
    for mode in MODES:
        for L in LENGTHS:
            row = {}
            for name in ("wm", "plain", "human", "wm_wrong_key"):
                ds = [decide(s, wm, mode, args.min_entropy, args.min_tokens, args.alpha, limit=L)
                      for s, n in zip(scored[name], n_tok[name]) if n >= L]
                row[name] = _rates(ds)
            neg = [decide(s, wm, mode, args.min_entropy, args.min_tokens, args.alpha, limit=L).z
                   for name in ("plain", "human") for s, n in zip(scored[name], n_tok[name]) if n >= L]
            row["tpr_at_empirical_1pct_fpr"] = _tpr_at_fpr(
                [decide(s, wm, mode, args.min_entropy, args.min_tokens, args.alpha, limit=L)
                 for s, n in zip(scored["wm"], n_tok["wm"]) if n >= L], neg, 0.01, args.min_tokens)
            out["by_length"][f"{mode}/{L}"] = row
        row = {}
        for name in ("wm", "wm_renamed", "wm_deleted20", "plain", "human"):
            ds = [decide(s, wm, mode, args.min_entropy, args.min_tokens, args.alpha) for s in scored[name]]
            row[name] = _rates(ds)
        out["edits"][mode] = row
    out["examples"] = {k: v[0][:400] for k, v in texts.items() if v}
    out["gen_tokens"] = {k: timing[k][1] for k in timing}
    out["gen_ms_per_token_batch"] = {k: 1000 * timing[k][0] / max(1, timing[k][1]) for k in timing}
    out["mean_generated_tokens"] = {k: sum(len(tok.encode(t)) for t in texts[k]) / max(1, len(texts[k]))
                                    for k in ("wm", "plain", "human")}
    del torch
    return out, texts


def _rates(ds) -> dict:
    n = len(ds)
    flagged = sum(d.verdict == "watermarked" for d in ds)
    short = sum(d.verdict == "too short to tell" for d in ds)
    zs = sorted(d.z for d in ds if d.n_scored)
    return {"n": n, "flagged": flagged, "rate": flagged / n if n else None, "too_short": short,
            "median_z": zs[len(zs) // 2] if zs else None,
            "median_scored": sorted(d.n_scored for d in ds)[n // 2] if n else None}


def _tpr_at_fpr(pos, neg_z, fpr, min_tokens) -> dict:
    """Threshold = the z that at most ``fpr`` of the negatives exceed; TPR of the positives."""
    if not neg_z or not pos:
        return {"threshold_z": None, "tpr": None, "n_neg": len(neg_z)}
    neg = sorted(neg_z, reverse=True)
    k = int(math.floor(fpr * len(neg)))  # this many negatives may lie above the threshold
    thr = neg[k] if k < len(neg) else -math.inf
    tp = sum(d.z > thr and d.n_scored >= min_tokens for d in pos)
    return {"threshold_z": thr, "tpr": tp / len(pos), "n_neg": len(neg)}


# --------------------------------------------------------------------------- cost
def run_cost(loaded, args, wm, log=_log) -> dict:
    from assistant.evaluate import (
        MBPP_STOPS,
        _eval_dir,
        _run_parallel,
        _run_tests,
        exact_match,
        load_mbpp,
        mbpp_infill_items,
        mbpp_program,
        mbpp_prompt,
    )
    from model.formats import fim_prompt
    from model.generate import SamplingParams, fim_stop_ids

    tok = loaded.tokenizer
    tasks = load_mbpp(_eval_dir(args.eval_dir))
    out: dict = {}
    stop_ids = fim_stop_ids(tok)
    items = mbpp_infill_items(tasks[: args.mbpp_infill], args.seed)
    prompts = [fim_prompt(tok, it["prefix"], it["suffix"], spm=True) for it in items]
    temps = [float(t) for t in args.cost_temps.split(",")] if args.cost_temps else [args.temperature, 0.0]
    for temp in temps:
        for arm in ("plain", "wm"):
            p = SamplingParams(max_new_tokens=64, temperature=temp, top_p=args.top_p, seed=args.seed,
                               stop_strings=("\n",), stop_token_ids=stop_ids, watermark=wm if arm == "wm" else None)
            res, dt = _generate(loaded, prompts, p, args.batch)
            preds = [r.text for r in res]
            em = [exact_match(pr, it["middle"]) for pr, it in zip(preds, items)]

            def check(ip):
                it, pr = ip
                return _run_tests(mbpp_program(it["task"], it["prefix"] + pr.rstrip("\n") + "\n" + it["suffix"]), 10.0)

            passed = _run_parallel(check, list(zip(items, preds)), args.jobs)
            out[f"mbpp_infill/T={temp}/{arm}"] = {"n": len(items), "exact": sum(em), "passed": sum(passed),
                                                   "exact_rate": sum(em) / len(items), "pass_rate": sum(passed) / len(items)}
            log(f"cost: mbpp-infill T={temp} {arm}: {sum(em)} exact, {sum(passed)} pass of {len(items)}")
    if args.mbpp <= 0:
        return out
    built = [(t, mbpp_prompt(t)) for t in tasks[: args.mbpp]]
    built = [(t, pp) for t, pp in built if pp is not None]
    prompts = [[tok.eos_id, *tok.encode(pp[0])] for _, pp in built]
    for arm in ("plain", "wm"):
        p = SamplingParams(max_new_tokens=128, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                           stop_strings=MBPP_STOPS, watermark=wm if arm == "wm" else None)
        res, dt = _generate(loaded, prompts, p, args.batch)
        passed = _run_parallel(lambda tp: _run_tests(mbpp_program(tp[0], tp[1]), 10.0),
                               [(t, pp[0] + r.text) for (t, pp), r in zip(built, res)], args.jobs)
        out[f"mbpp/T={args.temperature}/{arm}"] = {"n": len(built), "passed": sum(passed),
                                                   "pass_rate": sum(passed) / max(1, len(built))}
        log(f"cost: mbpp T={args.temperature} {arm}: {sum(passed)} of {len(built)}")
    return out


def run_latency(loaded, items, args, wm, log=_log) -> dict:
    """Batch-1 streaming ms/token (prefill excluded), arms interleaved, median of the rounds."""
    from model.generate import SamplingParams, stream

    per = {"plain": [], "wm": []}
    for rnd in range(args.latency_rounds):
        for it in items[: args.latency_prompts]:
            for arm in (("plain", "wm") if rnd % 2 == 0 else ("wm", "plain")):
                p = SamplingParams(max_new_tokens=64, temperature=args.temperature, top_p=args.top_p,
                                   seed=args.seed + rnd, watermark=wm if arm == "wm" else None)
                s = stream(loaded.model, loaded.tokenizer, it["prompt_ids"], p)
                it_ = iter(s)
                next(it_)  # the first token carries the prefill
                t, n = time.perf_counter(), 0
                for _ in it_:
                    n += 1
                if n:
                    per[arm].append(1000 * (time.perf_counter() - t) / n)
        log(f"latency: round {rnd + 1}/{args.latency_rounds}")
    med = {k: sorted(v)[len(v) // 2] if v else None for k, v in per.items()}
    return {"ms_per_token_batch1_median": med, "samples": {k: len(v) for k, v in per.items()},
            "ratio": (med["wm"] / med["plain"]) if med["plain"] and med["wm"] else None}


def run_micro(vocab: int = 16384, batches=(1, 16), calls: int = 100) -> dict:
    """The sampling step alone (no model): plain vs watermarked, interleaved, median ms."""
    import statistics

    import torch

    from model.generate import SamplingParams, sample, sampling_probs
    from model.watermark import Watermark, WatermarkState

    torch.manual_seed(0)
    out = {}
    for B in batches:
        logits = torch.randn(B, vocab) * 4
        p = SamplingParams(temperature=0.7, seed=0)
        gen = torch.Generator().manual_seed(0)
        ts: dict[str, list[float]] = {"plain": [], "wm": []}
        for it in range(calls):
            for arm in (("plain", "wm") if it % 2 == 0 else ("wm", "plain")):
                t = time.perf_counter()
                if arm == "plain":
                    sample(logits, p, gen)
                else:
                    st = WatermarkState(Watermark("k"), [[1, 2, 3, it]] * B)
                    st.push(st.sample(logits, p, gen, sampling_probs).tolist())
                ts[arm].append((time.perf_counter() - t) * 1000)
        out[f"batch{B}"] = {k: statistics.median(v) for k, v in ts.items()}
        _log(f"micro: batch {B}: plain {out[f'batch{B}']['plain']:.2f} ms, watermark {out[f'batch{B}']['wm']:.2f} ms")
    return out


# --------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m assistant.watermark_bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None, help="held-out corpus (moecoder data corpus ... --splits 0,0,1)")
    p.add_argument("--micro", action="store_true", help="only time the sampling step alone (no model, no data)")
    p.add_argument("--eval-dir", default=None, help="../shared/eval (default: the project's)")
    p.add_argument("--key", default="watermark-bench-key")
    p.add_argument("--n", type=int, default=160, help="held-out prompts")
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-entropy", type=float, default=1.0, help="detector, --entropy model")
    p.add_argument("--min-tokens", type=int, default=24)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--mbpp-infill", type=int, default=427)
    p.add_argument("--mbpp", type=int, default=100)
    p.add_argument("--cost-temps", default=None, help="temperatures of the infill cost runs (default: T,0)")
    p.add_argument("--latency-prompts", type=int, default=8)
    p.add_argument("--latency-rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="", help="comma list of parts to skip: strength,cost,latency")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--texts", default=None, help="write the generated texts here (JSON)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.micro:
        print(json.dumps({"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                          "machine": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                          "sampling_step_ms_median": run_micro()}, indent=1))
        return 0
    if args.data is None:
        print("watermark_bench: error: --data is required (or --micro)", file=sys.stderr)
        return 2

    from assistant.evaluate import heldout_sources
    from model.checkpoint import load_model
    from model.watermark import Watermark

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    wm = Watermark(args.key)
    skip = set(filter(None, args.skip.split(",")))
    sources, where = heldout_sources(args.data, 100000, args.seed, loaded.tokenizer)
    items = body_items(sources, loaded.tokenizer, args.n, args.seed)
    report: dict = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
        "args": vars(args), "watermark": asdict(wm) | {"key": "<bench key>"}, "prompts_from": where,
        "packages": sorted({it["path"].split("site-packages/")[-1].split("/")[0] for it in items}),
    }
    _log(f"{len(items)} held-out prompts from {where}")
    t0 = time.perf_counter()
    texts = None
    if "strength" not in skip:
        report["strength"], texts = run_strength(loaded, items, args, wm)
    if "latency" not in skip:
        report["latency"] = run_latency(loaded, items, args, wm)
    if "cost" not in skip:
        report["cost"] = run_cost(loaded, args, wm)
    report["wall_s"] = time.perf_counter() - t0
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    if args.texts and texts is not None:
        Path(args.texts).write_text(json.dumps(texts))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
