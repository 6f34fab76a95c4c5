"""``moecoder data pack CORPUS --tokenizer TOK --out DIR``: tokenize shards into token files.

Layout (docs/interfaces.md, "Data on disk"): ``DIR/meta.json``; ``DIR/{split}.bin`` raw
little-endian tokens (uint16 when the vocabulary fits, else uint32), documents
concatenated, each followed by the eos id; ``DIR/{split}.idx`` an int64 ``.npy`` of
document start offsets (docs + 1 entries, the last = number of tokens).

Tokenization runs in worker processes on batches of documents; the output order is the
corpus order whatever the number of workers, so the same corpus and tokenizer give the
same bytes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from model.data.corpus import SPLITS, iter_split
from model.progress import Progress

BATCH_BYTES = 1 << 20  # text per worker task

_W: dict = {}


def _init(tok_path: str, dtype: str) -> None:
    from model.tokenizer import Tokenizer

    _W["tok"] = Tokenizer.load(tok_path)
    _W["dtype"] = np.dtype(dtype)


def _encode_batch(texts: list[str]) -> tuple[bytes, list[int], int]:
    """-> (little-endian token bytes with eos after each doc, per-doc token counts, text bytes)."""
    tok = _W["tok"]
    eos = tok.eos_id
    ids = tok.encode_batch(texts)
    lens = [len(x) + 1 for x in ids]
    flat: list[int] = []
    for doc in ids:
        flat.extend(doc)
        flat.append(eos)
    arr = np.array(flat, dtype=_W["dtype"].newbyteorder("<"))
    return arr.tobytes(), lens, sum(len(t.encode("utf-8")) for t in texts)


def _batches(corpus: Path, split: str) -> Iterator[list[str]]:
    batch, size = [], 0
    for rec in iter_split(corpus, split):
        text = rec["text"]
        if not text:
            continue
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def pack_corpus(corpus: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike,
                splits=SPLITS, workers: int = 0, overwrite: bool = False, progress: bool = True) -> dict:
    """Pack the corpus splits; returns the meta dict written to ``out/meta.json``."""
    from model.tokenizer import Tokenizer

    corpus, out = Path(corpus), Path(out)
    if not (corpus / "manifest.jsonl").is_file():
        raise ValueError(f"{corpus} is not a corpus directory (no manifest.jsonl)")
    tok = Tokenizer.load(tokenizer)  # TokenizerError (ValueError) on a bad file
    if (out / "meta.json").exists() and not overwrite:
        raise ValueError(f"{out} already holds packed tokens (meta.json); pass --overwrite to replace them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r} (choose from {', '.join(SPLITS)})")
    out.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    workers = workers or os.cpu_count() or 1
    manifest_bytes = {s: 0 for s in splits}
    manifest_docs = {s: 0 for s in splits}
    with open(corpus / "manifest.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["split"] in manifest_bytes:
                manifest_bytes[r["split"]] += r["bytes"]
                manifest_docs[r["split"]] += 1
    meta = {"dtype": dtype, "vocab_size": tok.vocab_size, "tokenizer": str(Path(tokenizer).resolve()),
            "eos_id": tok.eos_id, "pad_id": tok.pad_id, "corpus": str(corpus.resolve()), "splits": {}}
    t0 = time.perf_counter()
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers, initializer=_init, initargs=(str(tok.path), dtype)) if workers > 1 else None
    if pool is None:
        _init(str(tok.path), dtype)
    try:
        for s in splits:
            ts = time.perf_counter()
            tmp_bin = out / f"{s}.bin.tmp"
            lens: list[int] = []
            nbytes = 0
            prog = Progress(f"pack {s}", manifest_docs[s], enabled=progress)
            with open(tmp_bin, "wb") as fb:
                window = max(1, workers * 4)
                it = _batches(corpus, s)
                while True:
                    chunk = [b for _, b in zip(range(window), it)]
                    if not chunk:
                        break
                    results = pool.imap(_encode_batch, chunk) if pool else map(_encode_batch, chunk)
                    for data, blens, tb in results:
                        fb.write(data)
                        lens.extend(blens)
                        nbytes += tb
                        prog.update(len(lens), f"docs ({nbytes / 1e6:.0f} MB)")
            prog.update(len(lens), f"docs ({nbytes / 1e6:.0f} MB)")
            prog.close()
            offsets = np.zeros(len(lens) + 1, dtype=np.int64)
            if lens:
                np.cumsum(lens, out=offsets[1:])
            tmp_idx = out / f"{s}.idx.tmp"
            with open(tmp_idx, "wb") as fi:
                np.save(fi, offsets)
            os.replace(tmp_bin, out / f"{s}.bin")
            os.replace(tmp_idx, out / f"{s}.idx")
            dt = time.perf_counter() - ts
            ntok = int(offsets[-1])
            meta["splits"][s] = {"tokens": ntok, "docs": len(lens), "bytes": nbytes,
                                 "tokens_per_byte": round(ntok / nbytes, 5) if nbytes else None,
                                 "seconds": round(dt, 3)}
            if progress:
                print(f"pack {s}: {len(lens)} docs, {nbytes / 1e6:.1f} MB -> {ntok} tokens in {dt:.1f}s "
                      f"({nbytes / 1e6 / max(dt, 1e-9):.1f} MB/s, {workers} workers)", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    meta["workers"] = workers
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / "meta.json")
    return meta
