"""Deterministic, resumable batches from packed token files.

Reads the packed layout of docs/interfaces.md ("Data on disk"): ``meta.json``,
``{split}.bin`` (documents concatenated, each followed by eos) and ``{split}.idx`` (int64
document start offsets, M+1 entries).

``BatchLoader`` walks the documents of each source in a per-epoch permutation drawn from
the seed, FIM-transforms code documents (never task documents), and packs everything into a
token stream cut into rows of ``seq_len + 1`` tokens (inputs = row[:-1], targets = row[1:];
consecutive rows overlap by one token so no target is lost). Sources are mixed by tokens:
a task document is taken whenever the task share so far is below ``task_ratio``.

All randomness is a function of ``(seed, source, epoch, document)``, so the position
(``state_dict()``) is small and ``load_state_dict`` resumes the exact same stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.data.fim import FIMConfig, FIMTokens, fim_transform, split_long


class DataError(ValueError):
    """Missing or malformed packed data; the message is one line for the user."""


@dataclass
class Packed:
    """One split of a packed token directory (memory-mapped)."""

    root: Path
    split: str
    meta: dict
    tokens: np.ndarray
    doc_offsets: np.ndarray

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "code"))

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[int(self.doc_offsets[i]) : int(self.doc_offsets[i + 1])]


def read_meta(root: str | Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{root} has no meta.json (not a packed token directory; run `moecoder data pack`)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "dtype" not in meta or "splits" not in meta:
        raise DataError(f"{meta_path} lacks 'dtype'/'splits' (not a packed token directory)")
    return meta


def open_split(root: str | Path, split: str) -> Packed:
    """Open ``root/{split}.bin`` + ``.idx``; uses ``model.data.packed.PackedTokens`` when present."""
    root = Path(root)
    meta = read_meta(root)
    bin_path, idx_path = root / f"{split}.bin", root / f"{split}.idx"
    if not bin_path.is_file() or not idx_path.is_file():
        raise DataError(f"{root} has no {split} tokens ({bin_path.name}/{idx_path.name} missing)")
    try:
        from model.data.packed import PackedTokens  # owner: data (#2)

        pt = PackedTokens(root, split)
        tokens, offsets = pt.tokens, np.asarray(pt.doc_offsets, dtype=np.int64)
    except ImportError:
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        if bin_path.stat().st_size == 0:
            raise DataError(f"{bin_path} is empty (no tokens)") from None
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        try:
            offsets = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{idx_path} is not a valid .npy index: {e}") from None
        offsets = np.asarray(offsets, dtype=np.int64)
    except Exception as e:  # PackedTokens' own validation errors
        raise DataError(f"cannot read {split} tokens in {root}: {e}") from None
    if len(tokens) == 0 or len(offsets) < 2:
        raise DataError(f"{root} has no {split} tokens")
    if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        raise DataError(f"{idx_path} does not match {bin_path.name} (offsets inconsistent)")
    return Packed(root=root, split=split, meta=meta, tokens=tokens, doc_offsets=offsets)


@dataclass
class _Cursor:
    epoch: int = 0
    pos: int = 0  # index into this epoch's permutation
    chunk: int = 0  # chunks of the current document already emitted
    tokens: int = 0  # tokens emitted from this source


@dataclass
class LoaderConfig:
    seq_len: int
    seed: int = 0
    fim: FIMConfig = field(default_factory=FIMConfig)
    task_ratio: float = 0.0
    max_doc_tokens: int | None = None  # FIM chunk length; default seq_len


class BatchLoader:
    """``next_batch(B) -> int64 array [B, seq_len + 1]``; ``state_dict`` / ``load_state_dict``."""

    def __init__(
        self,
        code: Packed,
        cfg: LoaderConfig,
        special: FIMTokens,
        nl_mask: np.ndarray | None = None,
        tasks: Packed | None = None,
    ):
        if cfg.seq_len < 1:
            raise ValueError("seq_len must be >= 1")
        if not 0.0 <= cfg.task_ratio < 1.0:
            raise ValueError(f"task_ratio must be in [0, 1), got {cfg.task_ratio}")
        if cfg.task_ratio > 0 and tasks is None:
            raise ValueError("task_ratio > 0 needs task data")
        self.cfg = cfg
        self.special = special
        self.nl_mask = nl_mask
        self.sources: dict[str, Packed] = {"code": code}
        if tasks is not None and cfg.task_ratio > 0:
            self.sources["tasks"] = tasks
        self.max_doc = int(cfg.max_doc_tokens or cfg.seq_len)
        self._cursors = {name: _Cursor() for name in self.sources}
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}
        self._buf = np.zeros(0, dtype=np.int64)
        self.rows = 0

    # ---- documents -------------------------------------------------------------------
    def _perm(self, name: str, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(name)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        sid = 0 if name == "code" else 1
        perm = np.random.default_rng([self.cfg.seed, sid, epoch, 0x5EED]).permutation(self.sources[name].num_docs)
        self._perm_cache[name] = (epoch, perm)
        return perm

    def _next_piece(self, name: str) -> np.ndarray:
        """The next chunk of the next document of source ``name``, transformed."""
        src, cur = self.sources[name], self._cursors[name]
        perm = self._perm(name, cur.epoch)
        doc_id = int(perm[cur.pos])
        doc = np.asarray(src.doc(doc_id), dtype=np.int64)
        if name != "code":  # task examples: as packed, never FIM'd nor split
            self._advance(cur, src)
            return doc
        if len(doc) and doc[-1] == self.special.eos:
            doc = doc[:-1]
        chunks = split_long(doc, self.max_doc, self.nl_mask)
        k = cur.chunk
        last = k == len(chunks) - 1
        rng = np.random.default_rng([self.cfg.seed, 0, cur.epoch, doc_id, k])
        out = fim_transform(chunks[k], rng, self.special, self.cfg.fim, self.nl_mask, end_with_eos=last)
        if last:
            self._advance(cur, src)
        else:
            cur.chunk += 1
        return out

    @staticmethod
    def _advance(cur: _Cursor, src: Packed) -> None:
        cur.chunk = 0
        cur.pos += 1
        if cur.pos >= src.num_docs:
            cur.pos = 0
            cur.epoch += 1

    def _pick_source(self) -> str:
        if "tasks" not in self.sources:
            return "code"
        t = self._cursors["tasks"].tokens
        total = t + self._cursors["code"].tokens
        return "tasks" if t < self.cfg.task_ratio * total else "code"

    # ---- rows ------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> np.ndarray:
        L = self.cfg.seq_len
        need = batch_size * L + 1
        pieces = [self._buf]
        have = len(self._buf)
        while have < need:
            name = self._pick_source()
            piece = self._next_piece(name)
            self._cursors[name].tokens += len(piece)
            pieces.append(piece)
            have += len(piece)
        stream = np.concatenate(pieces) if len(pieces) > 1 else self._buf
        idx = np.arange(batch_size)[:, None] * L + np.arange(L + 1)[None, :]
        batch = stream[idx]
        self._buf = stream[batch_size * L :].copy()  # the last target is the next row's first input
        self.rows += batch_size
        return batch

    def epoch(self) -> float:
        """Epochs of code data consumed (fractional)."""
        cur = self._cursors["code"]
        return cur.epoch + cur.pos / max(1, self.sources["code"].num_docs)

    # ---- resume ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "cursors": {n: vars(c).copy() for n, c in self._cursors.items()},
            "buf": self._buf.tolist(),
            "rows": self.rows,
            "seed": self.cfg.seed,
            "docs": {n: s.num_docs for n, s in self.sources.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("docs") != {n: s.num_docs for n, s in self.sources.items()}:
            raise DataError(
                f"the checkpoint's data position is for other data (documents {state.get('docs')}, "
                f"now {({n: s.num_docs for n, s in self.sources.items()})})"
            )
        self._cursors = {n: _Cursor(**c) for n, c in state["cursors"].items()}
        self._buf = np.asarray(state["buf"], dtype=np.int64)
        self.rows = int(state["rows"])


def eval_rows(data: Packed, seq_len: int, max_tokens: int, seed: int = 1234) -> np.ndarray:
    """Rows ``[R, seq_len + 1]`` for evaluation: whole documents (no FIM), each followed by its eos.

    When the split holds more than ``max_tokens`` tokens, documents are taken in a fixed
    pseudo-random order (``seed``) until the budget is met, so the sample spreads over the
    whole split rather than its first packages. Uses at most ``max_tokens`` targets (at least
    one row; a stream shorter than a row gives one shorter row). Rows overlap by one token, so
    every token after the first is a target exactly once.
    """
    n = len(data.tokens)
    if n <= max_tokens + 1:
        stream = np.asarray(data.tokens, dtype=np.int64)
    else:
        order = np.random.default_rng(seed).permutation(data.num_docs)
        pieces, have = [], 0
        for i in order:
            d = np.asarray(data.doc(int(i)), dtype=np.int64)
            pieces.append(d)
            have += len(d)
            if have >= max_tokens + 1:
                break
        stream = np.concatenate(pieces)
    n = len(stream)
    if n < seq_len + 1:  # a tiny split: one shorter row
        return stream[None, :]
    rows = max(1, min(max_tokens, n - 1) // seq_len)
    rows = min(rows, (n - 1) // seq_len)
    idx = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]
