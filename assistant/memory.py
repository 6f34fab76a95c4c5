"""Repository memory for completion: a kNN-LM over the user's project.

Every token position of the project's Python files, read left to right by the model, is kept
as (the head's input there, the token that followed): Khandelwal et al., 2020, "Generalization
through Memorization: Nearest Neighbor Language Models". At each step of a completion with
repository context the ``K`` nearest entries vote for the next token::

    p = (1 - lam) p_model + lam p_knn,    p_knn(y) = sum over the K nearest with token y of
                                          softmax(-d / (TAU x d_nearest))
    lam = LAM_MAX x exp(-r / R0),         r = d_nearest / |q|^2

(``d``: squared distance, ``q``: the projected query). The memory is trusted as far as it has
seen something close: on development packages its top-1 token was right 96% of the time where
``r`` < 0.09 (the model's: 65%) and 52% where ``r`` > 0.58 (the model's: 74%). The model never
learnt the user's project; its own reading of the project's code gives the identifiers and
idioms there back to it. Nothing is trained, so any local model and any face that passes the
repository (``TaskRequest.repo``) gets it.

* The entries of the file being edited are left out: its text is in the prompt already, and the
  copy on disk may be older than the editor's.
* Keys are projected on the project's ``PCA_DIMS`` principal components (float32): a quarter of
  the memory and of the search time of the full 512, the same token accuracy on development
  packages (``scripts/knn_repo.py --teacher --dims 128`` against ``--dims 512``). The projection is computed once (from
  the first ``PCA_MIN`` positions, or the whole project if smaller); files read later are
  projected as they are read, so taking in a changed file costs its reading only.
* The search is exact (one matrix-vector product over all keys) below ``IVF_MIN`` entries. It
  streams every key from memory for each generated token: ~40 ms for textual's 700k positions on
  2 cores. From ``IVF_MIN`` entries an inverted-file index is used instead: k-means cells, fixed
  once built, and each token searches the entries of its ``IVF_PROBE`` nearest cells.
* Built once per (model, project), on the engine's thread at the first completion that asks
  (2,800 tokens a second on 2 cores: textual's 2.7 MB takes 4 minutes), or a slice at a time
  (``read_s`` / ``stop``, checked between the model's windows of a file, so a long file is read
  over several slices: the language server's idle reader); a file whose size or modification time
  changed is read again at the next use, at most every ``RECHECK_S``.
* At most ``MAX_POSITIONS`` entries (the files in ``RepoIndex`` order).
* Kept on disk (``MemoryCache``: per model and project, under ``~/.cache/moecoder/memory``), so a
  new process reads only the files that changed since; ``MOECODER_MEMORY_CACHE=0`` turns it off.

Measured (docs/benchmarks.md, "Repository memory (kNN-LM) for completion"): chosen on development
packages, confirmed on the held-out packages of the repo-fim suite.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

LAM_MAX = 1.0  # the memory's share of the next-token distribution at distance 0
# ... falling as exp(-r / R0) with the nearest entry's relative distance r. 0.2 for the weights shipped on
# 2026-12-07 22:45 UTC (repo-fim, development packages, 120 lines: 0.1 10.0%, 0.2 12.5%, 0.4 9.2%, 0.8 7.5%;
# held-out 0.2 12.5% vs 0.4 11.7%; fim with the memory, 400 held-out lines: 17.25% vs 15.0%); 0.4 before
R0 = 0.2
TAU = 0.1  # softmax temperature, relative to the nearest entry's distance
K = 32  # entries that vote
PCA_DIMS = 128
PCA_MIN = 20_000  # positions read before the projection is fixed (a small project: once it is all read)
WINDOW = 1024  # tokens read at once (the shipped model's context)
OVERLAP = 256  # a window after the first keeps only positions with at least this much context
MAX_POSITIONS = 1_500_000
# entries from which the search goes through an inverted-file index (k-means cells). 20k: on the held-out
# packages below 100k entries (pygls, jsonschema, cattrs) the index gives the exact search's token
# accuracy (71.6% top-1, NLL 1.298 vs 1.299) at 0.5 ms a token instead of 5.3 (pygls; docs/benchmarks.md)
IVF_MIN = 20_000
IVF_PROBE = 16  # cells searched per query, of about 2 sqrt(entries)
RECHECK_S = 30.0
CACHE_VERSION = 2  # the on-disk layout of a memory (``MemoryCache``)


class RepoMemory:
    """The memory of one project for one model (``entries`` positions)."""

    def __init__(self, model, tok, root: str | os.PathLike, progress=None, read_s: float | None = None, stop=None):
        self.model, self.tok, self.root = model, tok, Path(root).resolve()
        self.complete = False  # every file read (False: a read budget ran out; the rest comes later)
        # the projection is fixed once PCA_MIN positions (or the whole project) were read; before,
        # blocks hold the raw head inputs and each re-stack computes it again
        self._fixed = False
        self.centroids = None  # the inverted-file index's cells, fixed once IVF_MIN entries are projected
        self._assign: dict[str, object] = {}  # rel -> each entry's cell
        # rel -> ((mtime, size), head inputs [n, D] float16, next token ids [n])
        self._blocks: dict[str, tuple[tuple[float, int], object, object]] = {}
        self._partial: dict[str, dict] = {}  # rel -> a file read part way (stamp, ids, windows read)
        self._lines: dict[str, object] = {}  # rel -> the 0-based line of each entry's next token (int32)
        self._checked = 0.0
        self.progress = progress
        self.build_s = 0.0
        self.cache = MemoryCache.for_memory(model, self.root)
        self.loaded = self.cache.load(self) if self.cache is not None else 0  # files taken from the cache
        self.refresh(force=True, read_s=read_s, stop=stop)

    # ------------------------------------------------------------------ building
    def _files(self) -> list[str]:
        from assistant.repo import RepoIndex

        return list(RepoIndex(self.root).files())

    def _read_file(self, text: str, state: dict | None = None, stop=None):
        """(head inputs [N, D] float16, next token ids [N], their lines [N]) of one file's text; None when ``stop()``
        said so between two windows (after one window at least): ``state`` then holds where to go on."""
        import torch

        if state is None:
            state = {}
        if "ids" not in state:
            state.update(ids=self.tok.encode(text) + [int(self.tok.eos_id)], a=0, keys=[], vals=[])
        ids, keys, vals = state["ids"], state["keys"], state["vals"]
        device = self.model.tok_emb.weight.device
        window = min(WINDOW, self.model.cfg.max_seq_len)
        overlap = min(OVERLAP, window // 4)
        a, done = state["a"], 0
        with torch.inference_mode():
            while a < max(1, len(ids) - 1):  # the next window keeps from a + window - 1
                if done and stop is not None and stop():
                    state["a"] = a
                    return None
                x = ids[a:a + window]
                if len(x) < 2:
                    break
                h = self.model(torch.tensor([x[:-1]], device=device), head=False)[0]  # no logits needed
                lo = 0 if a == 0 else overlap
                keys.append(h[lo:].to("cpu", torch.float16))  # projected later
                vals.append(torch.tensor(x[1 + lo:]))
                done += 1
                if a + window >= len(ids):
                    break
                a += window - 1 - overlap
        if not keys:
            return (torch.zeros(0, self.model.cfg.dim, dtype=torch.float16), torch.zeros(0, dtype=torch.long),
                    torch.zeros(0, dtype=torch.int32))
        v = torch.cat(vals)
        nl = _newlines(self.tok)[torch.tensor(ids[:-1])]  # newlines in each token but the last
        lines = torch.cumsum(nl, 0, dtype=torch.int32)[: v.shape[0]]  # before token t + 1: its line
        return torch.cat(keys), v, lines

    def refresh(self, force: bool = False, read_s: float | None = None, stop=None) -> None:
        """Read the files that are new or changed since the last look (at most every RECHECK_S, at
        once while the memory is incomplete); ``read_s``: stop reading after this many seconds,
        ``stop()``: stop when it says so (both checked between two windows of a file, after one
        window at least; a file left half read goes on from there at the next call)."""
        now = time.monotonic()
        if not force and self.complete and now - self._checked < RECHECK_S:
            return
        self._checked = now
        t0 = time.monotonic()

        def halt() -> bool:
            return (read_s is not None and time.monotonic() - t0 > read_s) or (stop is not None and bool(stop()))

        files = self._files()
        changed = False
        dirty: set[str] = set()  # files read now (kept in the cache when it is on)
        seen, total, read = set(), 0, 0
        stopped = False
        self.complete = True
        for n, rel in enumerate(files):
            p = self.root / rel
            try:
                st = p.stat()
            except OSError:
                continue
            stamp = (st.st_mtime, st.st_size)
            seen.add(rel)
            old = self._blocks.get(rel)
            if old is not None and old[0] == stamp:
                total += old[2].shape[0]
                continue
            if total >= MAX_POSITIONS:
                continue
            if stopped or (read > 0 and halt()):
                stopped = True
                self.complete = False  # this file and the ones after it: at the next use (one window a use at least)
                if old is not None:
                    total += old[2].shape[0]
                continue
            part = self._partial.get(rel)
            if part is not None and part["stamp"] != stamp:
                part = None
            if part is None:
                try:
                    text = p.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                part = {"stamp": stamp}
            else:
                text = ""
            read += 1
            got = self._read_file(text, part, halt)
            if got is None:  # stopped inside the file: go on from there next time
                self._partial[rel] = part
                stopped = True
                self.complete = False
                if old is not None:
                    total += old[2].shape[0]
                continue
            self._partial.pop(rel, None)
            k, v, ln = got
            dirty.add(rel)
            self._blocks[rel] = (stamp, self._project(k) if self._fixed else k, v)
            self._lines[rel] = ln
            self._assign.pop(rel, None)
            total += v.shape[0]
            changed = True
            if self.progress is not None:
                self.progress(n + 1, len(files))
        gone = [rel for rel in self._blocks if rel not in seen]
        for rel in gone:
            del self._blocks[rel]
            self._lines.pop(rel, None)
            self._assign.pop(rel, None)
            changed = True
        for rel in list(self._partial):
            if rel not in seen:
                del self._partial[rel]
        if changed or force:
            basis = (self._fixed, self.centroids is not None)
            self._stack()
            if self.cache is not None:
                self.cache.save(self, dirty, gone, basis != (self._fixed, self.centroids is not None))
        self.build_s += time.monotonic() - t0

    def _stack(self) -> None:
        import torch

        rels = list(self._blocks)
        self.file_ids = {rel: i for i, rel in enumerate(rels)}
        self.vals = torch.cat([self._blocks[r][2] for r in rels]) if rels else torch.zeros(0, dtype=torch.long)
        self.fids = torch.cat([torch.full((self._blocks[r][2].shape[0],), i) for i, r in enumerate(rels)]) \
            if rels else torch.zeros(0, dtype=torch.long)
        self.lines = torch.cat([self._lines[r] for r in rels]) if rels else torch.zeros(0, dtype=torch.int32)
        self.spans, at = {}, 0  # rel -> (first entry, end): a file's entries are contiguous
        for r in rels:
            self.spans[r] = (at, at + self._blocks[r][2].shape[0])
            at = self.spans[r][1]
        if self._fixed:
            ks = [self._blocks[r][1] for r in rels]  # projected when read
        else:
            raw = [self._blocks[r][1] for r in rels]  # float16, the model's width
            n = sum(k.shape[0] for k in raw)
            D = self.model.cfg.dim
            step = max(1, n // 50_000)  # the components from a sample of at most ~50k positions
            sample = torch.cat([k[::step] for k in raw]).float() if n else torch.zeros(0, D)
            dims = min(PCA_DIMS, D)
            self.mean = sample.mean(0) if n else torch.zeros(D)
            if sample.shape[0] > dims:
                _, _, v = torch.linalg.svd(sample - self.mean, full_matrices=False)
                self.proj = v[:dims].T.contiguous()
            else:
                self.proj = torch.eye(D)[:, :dims].contiguous()
            ks = [self._project(k) for k in raw]
            if n >= PCA_MIN or self.complete:  # the basis stays; blocks are kept projected from now on
                self._fixed = True
                for r, k in zip(rels, ks):
                    self._blocks[r] = (self._blocks[r][0], k, self._blocks[r][2])
        self.keys = torch.cat(ks) if ks else torch.zeros(0, self.proj.shape[1])
        n = self.keys.shape[0]
        if self.centroids is None and self._fixed and n >= IVF_MIN:
            self.centroids = _kmeans(self.keys, max(IVF_PROBE, int(2 * n ** 0.5)))
        if self.centroids is not None:  # entries sorted by cell; a file's are no longer contiguous
            for r, k in zip(rels, ks):
                if r not in self._assign:
                    self._assign[r] = _nearest_cell(k, self.centroids)
            cell = torch.cat([self._assign[r] for r in rels])
            order = torch.argsort(cell, stable=True)
            self.keys, self.vals, self.fids = self.keys[order], self.vals[order], self.fids[order]
            self.lines = self.lines[order]
            counts = torch.bincount(cell, minlength=self.centroids.shape[0])
            self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).tolist()
            self.spans = {}
            self.cnorm = (self.centroids * self.centroids).sum(-1)
        self.knorm = (self.keys * self.keys).sum(-1)

    def _project(self, k):
        return (k.float() - self.mean) @ self.proj

    @property
    def entries(self) -> int:
        return int(self.vals.shape[0])

    # ------------------------------------------------------------------ use
    def _left_out(self, exclude, idx=None):
        """Which entries (of ``idx``, or all) ``exclude`` leaves out: a path under the root (all of that
        file's entries) or (path, first line): that file's entries from that 0-based line on."""
        rel, first = (exclude, None) if isinstance(exclude, str) else exclude
        fid = self.file_ids.get(rel)
        if fid is None:
            return None
        fids, lines = (self.fids, self.lines) if idx is None else (self.fids[idx], self.lines[idx])
        out = fids == fid
        return out if first is None else out & (lines >= first)

    def nearest(self, h_BD, exclude=None, k: int = K, with_norm: bool = False):
        """(squared distances [B, k'], next tokens [B, k'], finite [B, k']) of the nearest entries
        to the head inputs ``h_BD``, without the entries ``exclude`` names (``_left_out``: a file, or a
        file from a line on); ``with_norm``: and the projected queries' squared norms [B, 1]."""
        import torch

        q = (h_BD.float().cpu() - self.mean) @ self.proj
        qq = (q * q).sum(-1, keepdim=True)
        if self.centroids is not None:
            top, vals = self._search_cells(q, qq, exclude, k)
        else:
            d = self.knorm[None] - 2 * q @ self.keys.T + qq
            rel = exclude if isinstance(exclude, str) or exclude is None else exclude[0]
            span = self.spans.get(rel) if rel is not None else None
            if span is not None:  # a file's entries are contiguous here
                out = self._left_out(exclude, torch.arange(span[0], span[1]))
                d[:, span[0]:span[1]].masked_fill_(out[None], float("inf"))
            top, i = d.topk(min(k, d.shape[1]), dim=-1, largest=False)
            vals = self.vals[i]
        out = (top, vals, torch.isfinite(top))
        return (*out, qq) if with_norm else out

    def _search_cells(self, q, qq, exclude, k: int):
        """The k nearest among the entries of each query's IVF_PROBE nearest cells (padded with
        infinite distances where they hold fewer)."""
        import torch

        cells = (self.cnorm[None] - 2 * q @ self.centroids.T).topk(min(IVF_PROBE, self.centroids.shape[0]),
                                                                    dim=-1, largest=False).indices
        top = torch.full((q.shape[0], k), float("inf"))
        vals = torch.zeros((q.shape[0], k), dtype=torch.long)
        for b, row in enumerate(cells.tolist()):
            idx = torch.cat([torch.arange(self.offsets[c], self.offsets[c + 1]) for c in row])
            d = self.knorm[idx] - 2 * self.keys[idx] @ q[b] + qq[b]
            out = self._left_out(exclude, idx) if exclude is not None else None
            if out is not None:
                d[out] = float("inf")
            t, i = d.topk(min(k, d.shape[0]), largest=False)
            top[b, :t.shape[0]], vals[b, :t.shape[0]] = t, self.vals[idx[i]]
        return top, vals

    def mix(self, logits_BV, h_BD, exclude=None):
        """The logits to pick the next token from: log((1 - lam) softmax(logits) + lam p_knn)."""
        import torch

        if self.entries == 0:
            return logits_BV
        d, v, ok, qq = self.nearest(h_BD, exclude, with_norm=True)
        if d.shape[1] == 0 or not bool(ok[:, 0].all()):
            return logits_BV
        V = logits_BV.shape[-1]
        w = torch.softmax((-d / (TAU * d[:, :1].clamp_min(1e-6))).masked_fill(~ok, float("-inf")), dim=-1)
        p_knn = torch.zeros(d.shape[0], V).scatter_add_(1, v.clamp(0, V - 1), w)
        lam = LAM_MAX * torch.exp(-(d[:, :1] / qq.clamp_min(1e-6)).clamp_min(0) / R0)  # [B, 1]
        p = (1 - lam.to(logits_BV.device)) * logits_BV.float().softmax(-1) + (lam * p_knn).to(logits_BV.device)
        return p.clamp_min(1e-30).log()


_NEWLINES: dict[int, object] = {}


def _newlines(tok):
    """Newlines in each token id's bytes (int32 [vocab]), once per tokenizer."""
    import torch

    got = _NEWLINES.get(id(tok))
    if got is None:
        n = int(getattr(tok, "vocab_size", 0) or len(tok))
        got = torch.tensor([tok.decode_bytes([i]).count(b"\n") if hasattr(tok, "decode_bytes")
                            else tok.decode([i]).count("\n") for i in range(n)], dtype=torch.int32)
        _NEWLINES[id(tok)] = got
    return got


def _nearest_cell(x, centroids, chunk: int = 32_768):
    """Each row's nearest centroid (squared distance), ``chunk`` rows at a time."""
    import torch

    cn = (centroids * centroids).sum(-1)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([(cn[None] - 2 * x[i:i + chunk] @ centroids.T).argmin(-1) for i in range(0, x.shape[0], chunk)])


def _kmeans(x, cells: int, iters: int = 6, seed: int = 0):
    """``cells`` centroids of the rows of ``x`` (Lloyd's iterations on a sample of 32 rows a cell)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sample = x[torch.randperm(x.shape[0], generator=g)[:32 * cells]]
    c = sample[torch.randperm(sample.shape[0], generator=g)[:cells]].clone()
    for _ in range(iters):
        a = _nearest_cell(sample, c)
        sums = torch.zeros_like(c).index_add_(0, a, sample)
        count = torch.bincount(a, minlength=c.shape[0])[:, None]
        c = torch.where(count > 0, sums / count.clamp_min(1), c)  # an empty cell keeps its centroid
    return c


def _fingerprint(model) -> str:
    """A digest of the model's configuration and of a strided sample of every parameter: another
    model, or these weights after ``moecoder tune``, gets another cache."""
    import hashlib

    import torch

    h = hashlib.sha1(repr(getattr(model, "cfg", None)).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float32)
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


class MemoryCache:
    """A memory kept on disk, so that a new process (a restarted editor, ``moecoder complete --repo``)
    reads only the files that changed: ``<cache>/memory/<model and project digest>/`` holds ``meta.pt``
    (the projection and the index's cells, fixed once made) and a ``f-<digest>.pt`` per file (its
    stamp, projected keys in float16, next tokens, cells). Written only once the projection is fixed;
    a file is rewritten when it was read again. ``MOECODER_MEMORY_CACHE=0`` turns it off; the
    directory is ``$MOECODER_CACHE_DIR`` or ``$XDG_CACHE_HOME/moecoder`` (``~/.cache/moecoder``).
    Problems writing or reading it are ignored: the memory is then read as without it."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def for_memory(cls, model, root: Path) -> MemoryCache | None:
        import hashlib

        if os.environ.get("MOECODER_MEMORY_CACHE", "1").strip() == "0":
            return None
        base = os.environ.get("MOECODER_CACHE_DIR")
        if not base:
            base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "moecoder")
        key = hashlib.sha1(f"{_fingerprint(model)}|{root}|{PCA_DIMS}".encode()).hexdigest()[:24]
        return cls(Path(base) / "memory" / key)

    def _file(self, rel: str) -> Path:
        import hashlib

        return self.path / f"f-{hashlib.sha1(rel.encode()).hexdigest()[:24]}.pt"

    def load(self, mem: RepoMemory) -> int:
        """Fill ``mem`` from the cache; the number of files taken (0: none there, or unreadable)."""
        import torch

        meta = self.path / "meta.pt"
        if not meta.is_file():
            return 0
        try:
            m = torch.load(meta, weights_only=True)
            if m.get("version") != CACHE_VERSION:
                return 0
            blocks, assign, lines = {}, {}, {}
            for f in self.path.glob("f-*.pt"):
                b = torch.load(f, weights_only=True)
                rel = b["rel"]
                blocks[rel] = ((b["mtime"], b["size"]), b["keys"].float(), b["vals"].long())
                lines[rel] = b["lines"].to(torch.int32)
                if b.get("cells") is not None:
                    assign[rel] = b["cells"].long()
        except Exception as e:  # noqa: BLE001 - a broken cache is read again from the sources
            print(f"moecoder: ignoring the memory cache at {self.path}: {e}", file=sys.stderr)
            return 0
        mem.mean, mem.proj, mem._fixed = m["mean"], m["proj"], True
        mem.centroids = m.get("centroids")
        mem._blocks = blocks
        mem._lines = lines
        mem._assign = assign if mem.centroids is not None else {}
        return len(blocks)

    def save(self, mem: RepoMemory, dirty: set[str], gone: list[str], basis_changed: bool) -> None:
        """Write what changed: every file when the projection or the cells were just made."""
        import torch

        if not mem._fixed:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if basis_changed or not (self.path / "meta.pt").is_file():
                _atomic_save({"version": CACHE_VERSION, "mean": mem.mean, "proj": mem.proj,
                              "centroids": mem.centroids}, self.path / "meta.pt")
                dirty = set(mem._blocks)
            for rel in dirty:
                if rel not in mem._blocks:
                    continue
                (mtime, size), keys, vals = mem._blocks[rel]
                cells = mem._assign.get(rel)
                _atomic_save({"rel": rel, "mtime": float(mtime), "size": int(size), "keys": keys.to(torch.float16),
                              "vals": vals.to(torch.int32), "lines": mem._lines[rel].to(torch.int32),
                              "cells": None if cells is None else cells.to(torch.int32)}, self._file(rel))
            for rel in gone:
                self._file(rel).unlink(missing_ok=True)
        except OSError as e:
            print(f"moecoder: could not write the memory cache at {self.path}: {e}", file=sys.stderr)


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


_MEMORIES: dict[tuple[int, Path], RepoMemory] = {}
_LOCK = threading.Lock()


def memory_for(model, tok, root: str | os.PathLike, quiet: bool = False, read_s: float | None = None,
               stop=None) -> RepoMemory:
    """The memory of ``root`` for ``model`` (built on first use, refreshed after edits; ``read_s``:
    at most this long reading files now, ``stop()``: stop reading when it says so). Call it on the
    thread that runs the model (the engine's worker)."""
    key = (id(model), Path(root).resolve())
    with _LOCK:
        mem = _MEMORIES.get(key)
    if mem is not None:
        mem.refresh(read_s=read_s, stop=stop)
        return mem

    shown = [0.0]

    def progress(i: int, n: int) -> None:
        if quiet or time.monotonic() - shown[0] < 5.0:
            return
        shown[0] = time.monotonic()
        print(f"moecoder: reading {key[1]} for completion memory: file {i} of {n}", file=sys.stderr, flush=True)

    mem = RepoMemory(model, tok, key[1], progress=progress, read_s=read_s, stop=stop)
    with _LOCK:
        if len(_MEMORIES) >= 4:
            _MEMORIES.pop(next(iter(_MEMORIES)))
        _MEMORIES[key] = mem
    return mem


def can_read(model, root) -> bool:
    """Whether ``model`` can build a memory of ``root``: a local model of ours (it has the final norm
    whose input is the key) and an existing directory."""
    return model is not None and hasattr(model, "norm") and root is not None and os.path.isdir(root)


def peek(model, root: str | os.PathLike) -> RepoMemory | None:
    """The memory of ``root`` for ``model`` as read so far, without reading anything (None: none yet)."""
    with _LOCK:
        return _MEMORIES.get((id(model), Path(root).resolve()))


def forget(model) -> None:
    """Drop the memories read by ``model`` (its weights changed: ``moecoder tune``)."""
    with _LOCK:
        for key in [k for k in _MEMORIES if k[0] == id(model)]:
            del _MEMORIES[key]


class CompletionMemory:
    """``SamplingParams.mix`` for one completion: the memory of ``root`` without ``path``'s entries.
    The memory is built (or refreshed) at the first step, on the engine's thread."""

    def __init__(self, model, tok, root: str | os.PathLike, path: str | os.PathLike | None,
                 read_s: float | None = None):
        self.model, self.tok, self.root, self.read_s = model, tok, Path(root).resolve(), read_s
        self.exclude = None
        if path is not None:
            try:
                self.exclude = Path(path).resolve().relative_to(self.root).as_posix()
            except ValueError:
                self.exclude = None
        self._mem: RepoMemory | None = None

    def __call__(self, logits_BV, h_BD):
        if self._mem is None:
            if self.read_s is not None and self.read_s < 0:  # read elsewhere (an editor's idle time)
                self._mem = peek(self.model, self.root)
                if self._mem is None:
                    return logits_BV  # nothing read yet: the model alone
            else:
                self._mem = memory_for(self.model, self.tok, self.root, read_s=self.read_s)
        return self._mem.mix(logits_BV, h_BD, self.exclude)
