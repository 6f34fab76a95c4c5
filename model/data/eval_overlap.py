"""Keep evaluation programs out of training data.

``EvalIndex`` is built from the eval folder (``../shared/eval`` next to the repository, or
``$MOECODER_EVAL_DIR``): every QuixBugs program (buggy and fixed, tests included) and
every MBPP reference solution. A text *overlaps* the eval set when

* it shares a run of ``window`` consecutive normalised, non-trivial lines with an eval
  program (lines are compared with all whitespace removed, comment lines dropped), or
  contains a whole short eval function (fewer lines than the window, at least two); or
* it contains most (``containment``, default 60 %) of the token 5-gram shingles of one eval
  function (catches re-wrapped or re-indented copies).

Other code (the synthetic task generator) calls :func:`overlaps` or
``EvalIndex.load().match(text)``.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|[^\sA-Za-z0-9_]")
_WS = re.compile(r"\s+")
MIN_LINE_CHARS = 6  # normalised lines shorter than this ("else:", "pass", "}") are not evidence
SHINGLE = 5


def default_eval_dir() -> Path:
    env = os.environ.get("MOECODER_EVAL_DIR")
    if env:
        return Path(env)
    return (REPO_ROOT / ".." / "shared" / "eval").resolve()


def _norm_lines(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        s = _WS.sub("", line)
        if not s or s.startswith("#") or len(s) < MIN_LINE_CHARS:
            continue
        out.append(s)
    return out


def _h(parts: list[str]) -> int:
    # str hashes are salted per process; an index is only ever queried in the process that
    # built it (pickling rebuilds it, see EvalIndex.__reduce__)
    return hash("\n".join(parts))


_COMMENT_LINE = re.compile(r"(?m)^[ \t]*#.*$")
_MULT = np.uint64(0x100000001B3)


def token_hashes(text: str, strip_comments: bool = True, max_tokens: int = 200_000) -> np.ndarray:
    """Deterministic 64-bit hashes (the same in every process) of the code tokens of ``text``."""
    if strip_comments:
        text = _COMMENT_LINE.sub("", text)
    toks = _TOKEN.findall(text)[:max_tokens]
    vocab: dict[str, int] = {}
    ids = [vocab.setdefault(t, len(vocab)) for t in toks]
    uh = np.fromiter(
        (zlib.crc32(b) | (zlib.crc32(b, 0x9E3779B9) << 32) for b in (t.encode("utf-8", "surrogatepass") for t in vocab)),
        dtype=np.uint64, count=len(vocab))
    return uh[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, dtype=np.uint64)


def shingle_hashes(th: np.ndarray, k: int = SHINGLE) -> np.ndarray:
    """Sorted unique hashes of the token ``k``-grams (a text shorter than k: its whole token run)."""
    n = len(th) - k + 1
    if n <= 0:
        if not len(th):
            return np.zeros(0, dtype=np.uint64)
        n, k = 1, len(th)
    sh = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            sh = sh * _MULT + th[j : j + n]
    return np.unique(sh)


def _shingles(text: str) -> np.ndarray:
    th = token_hashes(text)
    if len(th) < SHINGLE:
        return np.zeros(0, dtype=np.uint64)
    return shingle_hashes(th)


def _functions(src: str) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes in eval snippets
            tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return []
    lines = src.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno:
            out.append("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    return out


@dataclass
class EvalIndex:
    """Fingerprints of the eval programs; ``match(text)`` names the first one ``text`` overlaps."""

    window: int = 4
    containment: float = 0.6
    min_shingles: int = 30  # shorter functions are covered by the whole-function line key
    windows: dict[int, str] = field(default_factory=dict)
    short_lengths: set[int] = field(default_factory=set)
    shingle_owner: dict[int, list[int]] = field(default_factory=dict)
    fn_names: list[str] = field(default_factory=list)
    fn_sizes: list[int] = field(default_factory=list)
    sources: list[tuple[str, str]] = field(default_factory=list)
    _sh_array: np.ndarray | None = None

    def __reduce__(self):
        return (_rebuild, (self.window, self.containment, self.min_shingles, self.sources))

    # -- building ----------------------------------------------------------------------------

    def add(self, name: str, src: str) -> None:
        self.sources.append((name, src))
        lines = _norm_lines(src)
        k = self.window
        if 2 <= len(lines) < k:
            self.windows.setdefault(_h(lines), name)
            self.short_lengths.add(len(lines))
        for i in range(len(lines) - k + 1):
            self.windows.setdefault(_h(lines[i : i + k]), name)
        for fn in _functions(src):
            fl = _norm_lines(fn)
            if 2 <= len(fl) < k:
                self.windows.setdefault(_h(fl), name)
                self.short_lengths.add(len(fl))
            sh = _shingles(fn)
            if len(sh) >= self.min_shingles:
                fid = len(self.fn_names)
                self.fn_names.append(name)
                self.fn_sizes.append(len(sh))
                for s in sh.tolist():
                    self.shingle_owner.setdefault(s, []).append(fid)
                self._sh_array = None

    @classmethod
    def from_dir(cls, eval_dir: str | os.PathLike, **kw) -> EvalIndex:
        """Index every ``*.py`` file and ``*.jsonl``/``*.json`` code field under ``eval_dir``."""
        idx = cls(**kw)
        root = Path(eval_dir)
        for p in sorted(root.rglob("*.py")):
            try:
                idx.add(f"{p.relative_to(root)}", p.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
        for p in sorted(root.rglob("*.json")) + sorted(root.rglob("*.jsonl")):
            try:
                text = p.read_text(encoding="utf-8", errors="replace")
                rows = json.loads(text) if p.suffix == ".json" else [json.loads(x) for x in text.splitlines() if x.strip()]
            except (OSError, ValueError):
                continue
            if isinstance(rows, dict):
                rows = [rows]
            if not isinstance(rows, list):
                continue
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    continue
                label = row.get("task_id", row.get("name", i))
                for key in ("code", "buggy_code", "fixed_code", "solution", "canonical_solution"):
                    if isinstance(row.get(key), str):
                        idx.add(f"{p.relative_to(root)}#{label}.{key}", row[key])
                tests = row.get("test_list")
                if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
                    idx.add(f"{p.relative_to(root)}#{label}.tests", "\n".join(tests))
        return idx

    @classmethod
    def load(cls, eval_dir: str | os.PathLike | None = None, warn: bool = True) -> EvalIndex:
        """The index of ``eval_dir`` (default :func:`default_eval_dir`); empty with a warning if missing."""
        d = Path(eval_dir) if eval_dir is not None else default_eval_dir()
        if not d.is_dir():
            if warn:
                warnings.warn(f"eval dir {d} not found: eval-overlap filtering is off", stacklevel=2)
            return cls()
        return cls.from_dir(d)

    # -- querying ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.sources)

    def match(self, text: str, shingles: np.ndarray | None = None) -> str | None:
        """Name of an eval program ``text`` overlaps, or None. ``shingles``: precomputed
        ``shingle_hashes(token_hashes(text))`` (saves the work when the caller has them)."""
        if not self.sources:
            return None
        lines = _norm_lines(text)
        k = self.window
        for L in (k, *sorted(self.short_lengths)):
            for i in range(len(lines) - L + 1):
                hit = self.windows.get(_h(lines[i : i + L]))
                if hit is not None:
                    return hit
        if self.shingle_owner:
            counts: dict[int, int] = {}
            owner = self.shingle_owner
            if self._sh_array is None:
                self._sh_array = np.array(sorted(owner), dtype=np.uint64)
            sh = _shingles(text) if shingles is None else shingles
            for s in sh[np.isin(sh, self._sh_array, assume_unique=True)].tolist():
                for f in owner[s]:
                    counts[f] = counts.get(f, 0) + 1
            for f, c in counts.items():
                if c >= self.containment * self.fn_sizes[f]:
                    return self.fn_names[f]
        return None


def _rebuild(window: int, containment: float, min_shingles: int, sources: list[tuple[str, str]]) -> EvalIndex:
    idx = EvalIndex(window=window, containment=containment, min_shingles=min_shingles)
    for name, src in sources:
        idx.add(name, src)
    return idx


@functools.lru_cache(maxsize=4)
def _cached(eval_dir: str | None) -> EvalIndex:
    return EvalIndex.load(eval_dir)


def overlaps(text: str, eval_dir: str | os.PathLike | None = None) -> bool:
    """True when ``text`` shares code with an evaluation program (index cached per dir)."""
    return _cached(None if eval_dir is None else str(eval_dir)).match(text) is not None


if __name__ == "__main__":  # pragma: no cover - manual check: python -m model.data.eval_overlap FILE...
    idx = EvalIndex.load()
    for f in sys.argv[1:]:
        print(f, idx.match(Path(f).read_text(encoding="utf-8", errors="replace")))
