"""Deterministic, resumable batches from packed token files.

Reads the packed layout of docs/interfaces.md ("Data on disk"): ``meta.json``,
``{split}.bin`` (documents concatenated, each followed by eos) and ``{split}.idx`` (int64
document start offsets, M+1 entries).

``BatchLoader`` walks the documents of each source in a per-epoch permutation drawn from
the seed, FIM-transforms code documents (never task documents), and packs everything into a
token stream cut into rows of ``seq_len + 1`` tokens (inputs = row[:-1], targets = row[1:];
consecutive rows overlap by one token so no target is lost). Every FIM example lies wholly
inside one row and task examples do not straddle rows (see ``BatchLoader``); no padding. Sources are mixed by tokens:
a task document is taken whenever the task share so far is below ``task_ratio``.

All randomness is a function of ``(seed, source, epoch, document)``, so the position
(``state_dict()``) is small and ``load_state_dict`` resumes the exact same stream.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.data.fim import FIMConfig, FIMTokens, apply_fim, fim_length, next_cut, plan_fim, split_long


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
    tokens: int = 0  # tokens emitted from this source (padding not counted)
    off: int = 0  # tokens of the current document already emitted (code)


@dataclass
class LoaderConfig:
    seq_len: int
    seed: int = 0
    fim: FIMConfig = field(default_factory=FIMConfig)
    task_ratio: float = 0.0
    max_doc_tokens: int | None = None  # chunk length of code documents; default seq_len
    # A FIM'd chunk is cut to fit the tail of the current row when that tail holds at least
    # this many document tokens; a shorter tail gets the chunk's start as plain text instead.
    min_fim_tokens: int = 64


LINE_SLACK = 64  # a chunk cut to fit a row ends at a line end within this many tokens of the room
PACKING_VERSION = 2  # 1: FIM examples could straddle rows; 2: every FIM example lies in one row


class BatchLoader:
    """``next_batch(B) -> int64 array [B, seq_len + 1]``; ``state_dict`` / ``load_state_dict``.

    Row ``r`` of the stream is ``stream[r * L : r * L + L + 1]`` (``L = seq_len``). Pieces go
    into the stream in order, with these rules:

    * a FIM example (``fim_length(n) = n + 4`` tokens) always lies wholly inside one row, so
      its middle is predicted with its prefix and suffix in view. The code chunk is cut to fit
      the room left in the current row (at most ``seq_len - 3`` document tokens, ending at a
      line end when one is near). When that room holds fewer than ``min_fim_tokens`` tokens,
      the chunk's start goes out as plain text up to the row's end instead, and the chunk's
      remainder (with fresh coin flips) starts the next row;
    * a task example that would straddle a row boundary (and fits in one row) waits while the
      rest of the row is filled with code;
    * plain code packs densely, as before: a plain document still runs on into the next row
      with nothing between, but it is chunked at row ends (near a line end) like FIM'd code,
      so plain and FIM chunks have the same lengths and the FIM share of code tokens stays
      close to ``fim_rate`` (each chunk draws its own coin flips, as before).

    So no padding is needed: every target is a document token and the training loss needs no
    mask. The price is a share of FIM tokens slightly below ``fim_rate`` (see ``fim_share``).
    """

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
        if cfg.fim.fim_rate > 0 and cfg.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8 with FIM (a FIM example needs 4 extra tokens), got {cfg.seq_len}")
        self.cfg = cfg
        self.special = special
        self.nl_mask = nl_mask
        self.sources: dict[str, Packed] = {"code": code}
        if tasks is not None and cfg.task_ratio > 0:
            self.sources["tasks"] = tasks
        self.max_doc = int(cfg.max_doc_tokens or cfg.seq_len)
        if self.max_doc < 1:
            raise ValueError(f"max_doc_tokens must be >= 1, got {self.max_doc}")
        L = cfg.seq_len
        self.fim_max = max(1, min(self.max_doc, L + 1 - fim_length(0)))  # L - 3: the example fills a row
        self.min_fill = max(1, min(int(cfg.min_fim_tokens), self.fim_max // 2))
        self._cursors = {name: _Cursor() for name in self.sources}
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}
        self._buf = np.zeros(0, dtype=np.int64)
        self.rows = 0
        self.fim_tokens = 0  # tokens of FIM examples put into the stream so far

    # ---- documents -------------------------------------------------------------------
    def _perm(self, name: str, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(name)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        sid = 0 if name == "code" else 1
        perm = np.random.default_rng([self.cfg.seed, sid, epoch, 0x5EED]).permutation(self.sources[name].num_docs)
        self._perm_cache[name] = (epoch, perm)
        return perm

    def _doc_id(self, name: str) -> int:
        cur = self._cursors[name]
        return int(self._perm(name, cur.epoch)[cur.pos])

    def _code_doc(self, doc_id: int) -> np.ndarray:
        """The code document's tokens without its trailing eos (a memmap view, not copied)."""
        doc = self.sources["code"].doc(doc_id)
        if len(doc) and int(doc[-1]) == self.special.eos:
            doc = doc[:-1]
        return doc

    def _code_piece(self, col: int, fill: bool) -> np.ndarray:
        """The next chunk of the current code document, transformed, to go at row column ``col``.

        ``fill``: the piece must end by the next row start (it fills the gap before a task
        example). A FIM example always ends inside the current row: its chunk is cut to fit;
        when the row's tail is too short for ``min_fim_tokens`` the chunk goes out plain instead,
        cut to end exactly at the next row start (so the following chunk starts a fresh row).
        """
        L = self.cfg.seq_len
        src, cur = self.sources["code"], self._cursors["code"]
        doc_id = self._doc_id("code")
        doc = self._code_doc(doc_id)
        rng = np.random.default_rng([self.cfg.seed, 0, cur.epoch, doc_id, cur.chunk])
        plan = plan_fim(rng, self.cfg.fim)
        rest = len(doc) - cur.off
        gap = L - col  # tokens to the next row start (col > 0 whenever this is short)
        room = gap if fill else gap + 1  # the most a FIM example here may take
        if plan.fim and rest > 0:
            budget = min(self.fim_max, room - 4)
            if rest <= budget:
                cut = len(doc)
            elif budget >= self.min_fill:
                cut = next_cut(doc, cur.off, budget, self.nl_mask, slack=min(budget // 2, LINE_SLACK))
            else:  # too little room for a useful FIM example: plain text up to the row start
                plan = dataclasses.replace(plan, fim=False)
                cut = min(len(doc), cur.off + gap)
        else:  # plain chunks end at the row's end too, so FIM and plain chunks are alike in length
            lim = min(self.max_doc, room)
            if rest <= lim:
                cut = len(doc)
            elif min(self.max_doc, gap) < self.min_fill:
                cut = cur.off + min(self.max_doc, gap)
            else:
                lim = min(self.max_doc, gap)
                cut = next_cut(doc, cur.off, lim, self.nl_mask, slack=min(lim // 2, LINE_SLACK))
        last = cut == len(doc)
        chunk = np.asarray(doc[cur.off : cut], dtype=np.int64)
        out = apply_fim(chunk, rng, self.special, plan, self.nl_mask, end_with_eos=last)
        if plan.fim and rest > 0:
            self.fim_tokens += len(out)
        if last:
            self._advance(cur, src)
        else:
            cur.chunk += 1
            cur.off = cut
        return out

    @staticmethod
    def _advance(cur: _Cursor, src: Packed) -> None:
        cur.chunk = 0
        cur.off = 0
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

    def _next_piece(self, col: int) -> tuple[str, np.ndarray]:
        """The next piece to put at row column ``col`` (0..L-1): (source, tokens)."""
        L = self.cfg.seq_len
        name = self._pick_source()
        if name == "tasks":
            src, cur = self.sources["tasks"], self._cursors["tasks"]
            doc_id = self._doc_id("tasks")
            n = int(src.doc_offsets[doc_id + 1] - src.doc_offsets[doc_id])
            if n <= L + 1 - col or n > L + 1:  # fits here, or fits no row at all: as packed
                self._advance(cur, src)
                return name, np.asarray(src.doc(doc_id), dtype=np.int64)
            return "code", self._code_piece(col, fill=True)  # code up to the row start; the example waits
        return name, self._code_piece(col, fill=False)

    # ---- rows ------------------------------------------------------------------------
    def next_batch(self, batch_size: int) -> np.ndarray:
        L = self.cfg.seq_len
        need = batch_size * L + 1
        pieces = [self._buf]
        have = len(self._buf)  # the buffer starts at a row start
        while have < need:
            name, piece = self._next_piece(have % L)
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

    def fim_share(self) -> float:
        """Share of the code tokens put into the stream so far that belong to FIM examples."""
        return self.fim_tokens / max(1, self._cursors["code"].tokens)

    # ---- resume ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "cursors": {n: vars(c).copy() for n, c in self._cursors.items()},
            "buf": self._buf.tolist(),
            "rows": self.rows,
            "seed": self.cfg.seed,
            "docs": {n: s.num_docs for n, s in self.sources.items()},
            "fim_tokens": self.fim_tokens,
            "packing": PACKING_VERSION,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("docs") != {n: s.num_docs for n, s in self.sources.items()}:
            raise DataError(
                f"the checkpoint's data position is for other data (documents {state.get('docs')}, "
                f"now {({n: s.num_docs for n, s in self.sources.items()})})"
            )
        cursors = {n: _Cursor(**c) for n, c in state["cursors"].items()}
        code = cursors.get("code")
        if state.get("packing") is None and code is not None and code.chunk > 0:
            # a position saved by the old packing (fixed chunks of max_doc tokens): find the
            # offset of the chunk it was at so the run goes on from the same place
            self._cursors = cursors
            doc = self._code_doc(self._doc_id("code"))
            chunks = split_long(doc, self.max_doc, self.nl_mask)
            code.off = int(sum(len(c) for c in chunks[: code.chunk]))
        self._cursors = cursors
        self._buf = np.asarray(state["buf"], dtype=np.int64)
        self.rows = int(state["rows"])
        self.fim_tokens = int(state.get("fim_tokens", 0))


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


def _bench(argv: list[str] | None = None) -> int:
    """``python -m model.data.loader PACKED``: FIM share, padding and speed of the packing."""
    import argparse
    import platform
    import time

    ap = argparse.ArgumentParser(prog="python -m model.data.loader", description=_bench.__doc__)
    ap.add_argument("data", help="a packed token directory (moecoder data pack)")
    ap.add_argument("--tasks", help="a packed task directory (kind 'tasks')")
    ap.add_argument("--task-ratio", type=float, default=0.0)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--fim-rate", type=float, default=0.5)
    ap.add_argument("--min-fim-tokens", type=int, default=LoaderConfig.min_fim_tokens)
    ap.add_argument("--tokenizer", help="tokenizer .model (default: the data's meta.json, else model/weights/)")
    a = ap.parse_args(argv)
    try:
        code = open_split(a.data, "train")
        tasks = open_split(a.tasks, "train") if a.tasks else None
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from model.data.fim import newline_mask
    from model.tokenizer import Tokenizer

    tok_path = a.tokenizer or code.meta.get("tokenizer") or str(Path(__file__).resolve().parents[1] / "weights")
    tok = Tokenizer.load(tok_path)
    special, nl = FIMTokens.from_tokenizer(tok), newline_mask(tok)
    cfg = LoaderConfig(seq_len=a.seq_len, fim=FIMConfig(fim_rate=a.fim_rate), task_ratio=a.task_ratio,
                       min_fim_tokens=a.min_fim_tokens)
    ld = BatchLoader(code, cfg, special, nl, tasks=tasks)
    L, n, t0 = a.seq_len, 0, time.perf_counter()
    straddle = fim_n = pads = 0
    while n < a.rows:
        b = ld.next_batch(a.batch)
        n += a.batch
        pads += int((b[:, 1:] == special.pad).sum())
        for row in b:  # FIM examples whose middle lacks its prefix/suffix in the row
            m = np.nonzero(row == special.middle)[0]
            fim_n += len(m)
            for i in m.tolist():
                e = np.nonzero(row[:i] == special.eos)[0]
                head = row[(int(e[-1]) + 1 if len(e) else 0) : i]
                straddle += not ((head == special.prefix).sum() == 1 and (head == special.suffix).sum() == 1)
    dt = time.perf_counter() - t0
    print(f"loader packing v{PACKING_VERSION} on {a.data}: {code.num_docs:,} docs, {len(code.tokens):,} tokens, "
          f"seq_len {L}, fim_rate {a.fim_rate}, min_fim_tokens {a.min_fim_tokens}"
          + (f", task_ratio {a.task_ratio}" if tasks is not None else ""))
    print(f"  rows {n:,} ({n * L:,} targets) in {dt:.2f}s: {n / dt:,.0f} rows/s, {n * L / dt / 1e6:.2f}M tokens/s")
    print(f"  padding share of targets {pads / (n * L):.4f}; FIM share of code tokens {ld.fim_share():.3f}; "
          f"FIM examples {fim_n:,}, without prefix+suffix in the row {straddle}")
    print(f"  {platform.machine()} {platform.python_version()} numpy {np.__version__} "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_bench())
