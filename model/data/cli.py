"""``moecoder data {corpus,tokenizer,pack,tasks}``: building training data.

Exit codes: 0 ok, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fractions(s: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in s.replace("/", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TRAIN,VALID,TEST fractions, got {s!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 fractions, got {s!r}")
    tot = sum(parts)
    if tot <= 0 or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"bad fractions {s!r}")
    return tuple(p / tot for p in parts)  # type: ignore[return-value]


def _cmd_corpus(argv: list[str]) -> int:
    from model.data.corpus import CorpusConfig, build_corpus

    p = _Parser(prog="moecoder data corpus", description="Build a deduplicated Python corpus from directories.")
    p.add_argument("roots", nargs="+", metavar="ROOT", help="directories to walk (site-packages, checkouts, sdists)")
    p.add_argument("--out", required=True, help="output directory (manifest.jsonl, report.json, split shards)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--eval-dir", default=None,
                   help="eval set to exclude (default: $MOECODER_EVAL_DIR or ../shared/eval next to the repo); "
                        "'' disables")
    p.add_argument("--max-bytes", type=int, default=1_000_000, help="skip larger files (default 1 MB)")
    p.add_argument("--near-threshold", type=float, default=0.8, help="near-duplicate Jaccard threshold")
    p.add_argument("--splits", type=_fractions, default=(0.98, 0.01, 0.01), help="train,valid,test by package")
    p.add_argument("--license-policy", choices=("any", "permissive"), default="any",
                   help="'any' keeps every file and reports non-permissive packages; 'permissive' drops them")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip directories/files whose name or relative path matches (repeatable)")
    p.add_argument("--shard-mb", type=float, default=64.0)
    p.add_argument("--overwrite", action="store_true", help="replace a corpus already in --out")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    eval_dir = a.eval_dir
    if eval_dir is None:
        from model.data.eval_overlap import default_eval_dir

        eval_dir = str(default_eval_dir())
    if eval_dir and not Path(eval_dir).is_dir():
        print(f"moecoder data corpus: warning: eval dir {eval_dir} not found; eval-overlap filtering is off",
              file=sys.stderr)
        eval_dir = ""
    cfg = CorpusConfig(max_bytes=a.max_bytes, near_threshold=a.near_threshold, split_fractions=a.splits,
                       license_policy=a.license_policy, exclude=tuple(a.exclude), eval_dir=eval_dir,
                       workers=a.workers, shard_bytes=int(a.shard_mb * (1 << 20)))
    res = build_corpus(a.roots, a.out, cfg, overwrite=a.overwrite, progress=not a.quiet)
    r = res.report
    print(f"kept {r['kept_files']} files ({r['kept_bytes'] / 1e6:.1f} MB) -> {a.out}/manifest.jsonl; "
          f"skipped {sum(r['skipped'].values())} ({', '.join(f'{k} {v}' for k, v in r['skipped'].items()) or 'none'}); "
          f"exact dups {r['dedupe']['exact_duplicates']}, near dups {r['dedupe']['near_duplicates']}, "
          f"eval overlap {r['eval_overlap']['files']}")
    return 0


def _cmd_tokenizer(argv: list[str]) -> int:
    from model.data.corpus import iter_split
    from model.tokenizer import Tokenizer, train_tokenizer

    p = _Parser(prog="moecoder data tokenizer", description="Train the sentencepiece BPE tokenizer on a corpus.")
    p.add_argument("corpus", metavar="CORPUS", help="a corpus directory from `moecoder data corpus`")
    p.add_argument("--out", required=True, help="output prefix or .model path (e.g. model/weights/tokenizer.model)")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--max-mb", type=float, default=150.0, help="train on at most this many MB of text (sampled)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-split", default="test", help="split to report tokens per byte on")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    corpus = Path(a.corpus)
    if not (corpus / "manifest.jsonl").is_file():
        raise ValueError(f"{corpus} is not a corpus (no manifest.jsonl)")
    if not 512 <= a.vocab_size <= 65536 * 16:
        raise ValueError(f"--vocab-size {a.vocab_size} out of range")
    out = Path(a.out)
    prefix = out.with_suffix("") if out.suffix == ".model" else out
    model_path = prefix.with_name(prefix.name + ".model")
    if model_path.exists() and not a.overwrite:
        raise ValueError(f"{model_path} exists; pass --overwrite to replace it")
    texts, total, budget = _sample_texts(corpus, "train", int(a.max_mb * 1e6))
    if not texts:
        raise ValueError(f"{corpus}: the train split is empty")
    print(f"tokenizer: training vocab {a.vocab_size} on {total / 1e6:.1f} MB of {len(texts)} files "
          f"(budget {budget / 1e6:.0f} MB)", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    tmp_prefix = prefix.with_name(prefix.name + ".tmp")
    path = train_tokenizer(texts, tmp_prefix, a.vocab_size, num_threads=a.threads or None)
    os.replace(path, model_path)
    dt = time.perf_counter() - t0
    tok = Tokenizer.load(model_path)
    nb = nt = nf = 0
    bad = 0
    for rec in iter_split(corpus, a.eval_split):
        ids = tok.encode(rec["text"])
        nb += len(rec["text"].encode("utf-8"))
        nt += len(ids)
        nf += 1
        if tok.decode(ids) != rec["text"]:
            bad += 1
    msg = f"tokenizer: {model_path} vocab {tok.vocab_size} trained in {dt:.1f}s"
    if nb:
        msg += (f"; {a.eval_split} split: {nf} files, {nb / 1e6:.2f} MB, {nt} tokens, "
                f"{nt / nb:.4f} tokens/byte ({nb / nt:.3f} bytes/token), round-trip failures {bad}")
    print(msg)
    return 1 if bad else 0


def _sample_texts(corpus: Path, split: str, budget: int) -> tuple[list[str], int, int]:
    """Deterministic sample of files of ``split`` up to ``budget`` bytes (every k-th file)."""
    import json

    rows = []
    with open(corpus / "manifest.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["split"] == split:
                rows.append(r)
    total = sum(r["bytes"] for r in rows)
    keep_every = max(1.0, total / budget) if budget > 0 else 1.0
    chosen = set()
    acc = 0.0
    for k, r in enumerate(rows):
        if k >= acc:
            chosen.add(r["path"])
            acc += keep_every
    from model.data.corpus import iter_split

    texts, n = [], 0
    for rec in iter_split(corpus, split):
        if rec["path"] in chosen:
            texts.append(rec["text"])
            n += len(rec["text"].encode("utf-8"))
    return texts, n, budget


def _cmd_pack(argv: list[str]) -> int:
    from model.data.pack import pack_corpus

    p = _Parser(prog="moecoder data pack", description="Tokenize a corpus into memory-mapped token files.")
    p.add_argument("corpus", metavar="CORPUS")
    p.add_argument("--tokenizer", default=None, help="tokenizer .model (default: the shipped model/weights/)")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--splits", default="train,valid,test")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    a = p.parse_args(argv)
    tok = a.tokenizer
    if tok is None:
        tok = str(Path(__file__).resolve().parents[1] / "weights" / "tokenizer.model")
    meta = pack_corpus(a.corpus, tok, a.out, splits=[s for s in a.splits.split(",") if s], workers=a.workers,
                       overwrite=a.overwrite, progress=not a.quiet)
    parts = [f"{s}: {v['tokens']} tokens / {v['docs']} docs" for s, v in meta["splits"].items()]
    print(f"packed -> {a.out} ({meta['dtype']}; " + "; ".join(parts) + ")")
    return 0


def _cmd_tasks(argv: list[str]) -> int:
    from model.data.tasks import main as tasks_main  # written by the task-data owner

    return tasks_main(argv)


COMMANDS = {
    "corpus": (_cmd_corpus, "build a deduplicated, split Python corpus from directories"),
    "tokenizer": (_cmd_tokenizer, "train the sentencepiece tokenizer on a corpus"),
    "pack": (_cmd_pack, "tokenize a corpus into memory-mapped token files"),
    "tasks": (_cmd_tasks, "generate synthetic task data (comment / debug / explain)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: moecoder data {" + ",".join(COMMANDS) + "} ...\n")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<10} {help_}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moecoder data: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][0](rest)
    except KeyboardInterrupt:
        print("moecoder data: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"moecoder data {name}: error: {msg}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if name == "tasks" and e.name == "model.data.tasks":
            print("moecoder data tasks: error: task-data generator not available (model.data.tasks)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
