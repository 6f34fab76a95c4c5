"""Completion examples with repository context, for training (issue #15).

``python -m model.data.repo_fim CORPUS --tokenizer T --tasks TASKS --out OUT`` reads the
corpus manifest (``moecoder data corpus``), groups the train split's files by package,
indexes each package's directory with ``model.data.repo_context.RepoIndex`` (stdlib ``ast``)
and writes single-line completion examples in the product's prompt layout:

    <fim_suffix> "\\n" + lines after <fim_prefix> [# path\\n stubs\\n\\n ...] lines before + indentation
    <fim_middle> the rest of the line <eos>

The cursor sits after the line's indentation, the rest of the line removed (what
``assistant.evaluate.completion_request`` and an editor send); the related slot holds what
``RepoIndex.context_for`` gives for that cursor, rendered by ``fit_related`` (the same code
as the completion prompt, ``related_sep=False``) within a share of a sampled prompt budget.
A ``--context-rate`` share of examples (where the file imports names of its package) carries
the context; the rest are the same kind of example without it. The examples are appended to a
copy of the task data (``OUT``: kind "tasks", train split only), so the loader mixes them in
with ``--task-ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

_TOK = None


def _tok(path: str):
    global _TOK
    if _TOK is None:
        from model.tokenizer import Tokenizer

        _TOK = Tokenizer.load(path)
    return _TOK


def package_root(path: str, package: str) -> Path | None:
    """The directory named ``package`` that holds ``path`` (None: a single-module package)."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == package:
            return Path(*parts[: i + 1])
    return None


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def example_ids(tok, count, lines: list[str], i: int, related: list[tuple[str, str]], budget: int, middle: str,
                related_share: float = 0.35, prefix_share: float = 0.7) -> list[int]:
    """One example: the prompt for a cursor after line ``i``'s indentation (``lines`` has the rest
    of that line removed), then ``middle`` (the removed text) and eos."""
    from model.data.repo_context import fit_related

    ind = _indent(lines[i])
    text_budget = budget - 3
    rel_ids: list[int] = []
    if related:
        rel_ids, _ = fit_related(tok, count, related, int(text_budget * related_share), sep=False)
    left = text_budget - len(rel_ids)
    pre_budget = int(left * prefix_share)
    pre: list[str] = [ind]
    used = count(ind)
    j = i - 1
    while j >= 0:
        c = count(lines[j] + "\n")
        if used + c > pre_budget:
            break
        pre.append(lines[j])
        used += c
        j -= 1
    suf_budget = left - used
    suf: list[str] = [""]
    sused = 0
    k = i + 1
    while k < len(lines):
        c = count("\n" + lines[k])
        if sused + c > suf_budget:
            break
        suf.append(lines[k])
        sused += c
        k += 1
    prefix_text = "\n".join(reversed(pre))
    suffix_text = "\n".join(suf)
    s, p, m, eos = (tok.special_id(n) for n in ("fim_suffix", "fim_prefix", "fim_middle", "eos"))
    return [s, *tok.encode(suffix_text), p, *rel_ids, *tok.encode(prefix_text), m, *tok.encode(middle), eos]


def _package_examples(job: tuple) -> tuple[list[np.ndarray], dict]:
    root, files, tok_path, n_want, seed, context_rate, budgets = job
    from model.data.repo_context import RepoIndex

    tok = _tok(tok_path)
    cache: dict[str, int] = {}

    def count(t: str) -> int:
        v = cache.get(t)
        if v is None:
            v = len(tok.encode(t))
            if len(cache) < 200_000:
                cache[t] = v
        return v

    rng = random.Random(seed)
    idx = RepoIndex(root)
    out: list[np.ndarray] = []
    stats = {"with_context": 0, "without": 0, "files": 0}
    files = list(files)
    rng.shuffle(files)
    per_file = max(1, -(-n_want // max(1, len(files))))
    for path in files:
        if len(out) >= n_want:
            break
        rel = idx.rel(path)
        text = idx._read(rel) if rel else None
        if not text:
            continue
        try:
            imported = {imp.local: imp for imp in idx.imported_names(text, rel)}
        except (RecursionError, ValueError):
            continue
        lines = text.split("\n")
        hits, others = [], []
        for i, ln in enumerate(lines[:-1]):
            st = ln.strip()
            if not 4 <= len(st) <= 120 or st.startswith(("#", "@", "import ", "from ")):
                continue
            names = set(st.replace(".", " ").replace("(", " ").split()) & set(imported)
            (hits if names else others).append(i)
        stats["files"] += 1
        picks = rng.sample(hits, min(len(hits), (per_file + 1) // 2))
        picks += rng.sample(others, min(len(others), per_file - len(picks)))
        for i in picks:
            budget = rng.choice(budgets)
            blanked = lines[:i] + [_indent(lines[i])] + lines[i + 1:]
            related: list[tuple[str, str]] = []
            if imported and rng.random() < context_rate:
                try:
                    related, _ = idx.context_for(rel, "\n".join(blanked), i, recent=[], imports_source=text)
                except (RecursionError, ValueError, OSError):
                    related = []
            ids = example_ids(tok, count, blanked, i, related, budget, lines[i][len(_indent(lines[i])):])
            if len(ids) > budget + 128:
                continue
            stats["with_context" if related else "without"] += 1
            out.append(np.asarray(ids, dtype=np.int32))
    return out, stats


def build(corpus: str, tokenizer: str, tasks: str | None, out: str, examples: int, workers: int,
          seed: int = 0, context_rate: float = 0.8, budgets: tuple[int, ...] = (448, 512, 640, 768, 896)) -> dict:
    t0 = time.perf_counter()
    by_pkg: dict[tuple[str, str], list[str]] = defaultdict(list)
    with open(Path(corpus) / "manifest.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("split") != "train":
                continue
            root = package_root(r["path"], r["package"])
            if root is not None and root.is_dir():
                by_pkg[(str(root), r["package"])].append(r["path"])
    total_files = sum(len(v) for v in by_pkg.values())
    if not total_files:
        raise SystemExit("error: no train-split file of a package directory in the corpus manifest")
    jobs = []
    for k, ((root, _pkg), files) in enumerate(sorted(by_pkg.items())):
        for c in range(0, len(files), 150):  # big packages in several jobs (each indexes lazily)
            part = files[c:c + 150]
            want = max(1, round(examples * len(part) / total_files))
            jobs.append((root, part, tokenizer, want, seed * 100_003 + k * 1000 + c // 150, context_rate, budgets))
    jobs.sort(key=lambda j: -len(j[1]))
    docs: list[np.ndarray] = []
    stats: dict[str, int] = defaultdict(int)
    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:
            for d, st in pool.imap_unordered(_package_examples, jobs):
                docs += d
                for k2, v in st.items():
                    stats[k2] += v
    else:
        for j in jobs:
            d, st = _package_examples(j)
            docs += d
            for k2, v in st.items():
                stats[k2] += v
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(docs))
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    meta: dict = {"kind": "tasks", "dtype": "uint16", "splits": {}}
    base_tokens = np.zeros(0, dtype=np.uint16)
    base_offsets = np.zeros(1, dtype=np.int64)
    if tasks:
        from model.data.loader import open_split, read_meta

        meta = {**read_meta(tasks), "splits": {}}
        t = open_split(tasks, "train")
        base_tokens, base_offsets = np.asarray(t.tokens), np.asarray(t.doc_offsets, dtype=np.int64)
    dtype = np.dtype(meta.get("dtype", "uint16")).newbyteorder("<")
    new = np.concatenate([docs[i] for i in order]).astype(dtype) if docs else np.zeros(0, dtype=dtype)
    lens = np.array([len(docs[i]) for i in order], dtype=np.int64)
    offsets = np.concatenate([base_offsets, base_offsets[-1] + np.cumsum(lens)])
    with open(outp / "train.bin", "wb") as fh:
        fh.write(np.asarray(base_tokens, dtype=dtype).tobytes())
        fh.write(new.tobytes())
    with open(outp / "train.idx", "wb") as fh:
        np.save(fh, offsets)
    rep = {"packages": len(by_pkg), "jobs": len(jobs), "files": total_files, "examples": len(docs), "tokens": int(lens.sum()),
           "mean_tokens": round(float(lens.mean()), 1) if len(lens) else 0, **stats,
           "task_tokens": int(len(base_tokens)), "seconds": round(time.perf_counter() - t0, 1)}
    meta["splits"]["train"] = {"tokens": int(offsets[-1]), "docs": len(offsets) - 1}
    meta["repo_fim"] = rep
    (outp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.data.repo_fim", description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", help="a corpus directory (manifest.jsonl of moecoder data corpus)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--tasks", help="packed task data to copy the examples into (default: examples only)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--examples", type=int, default=30000)
    ap.add_argument("--context-rate", type=float, default=0.8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not (Path(a.corpus) / "manifest.jsonl").is_file():
        print(f"error: {a.corpus} has no manifest.jsonl (run `moecoder data corpus`)", file=sys.stderr)
        return 2
    rep = build(a.corpus, a.tokenizer, a.tasks, a.out, a.examples, a.workers, a.seed, a.context_rate)
    print(json.dumps(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
