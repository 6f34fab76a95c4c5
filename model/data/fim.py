"""Fill-in-the-middle (FIM) transformation of token documents.

Works on token ids, not text, so it runs at training speed on packed data. A document is
cut at two points into ``prefix | middle | suffix`` and re-emitted in the completion format
of ``model.formats``::

    PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <eos>
    SPM  <fim_suffix> suffix <fim_prefix> prefix <fim_middle> middle <eos>

Two ways to choose the cut points:

* *line* mode (``line_rate`` of the FIM'd documents): cuts only on line boundaries, so the
  middle is one or more whole lines (half the time exactly one line). This is what
  single-line completion in an editor looks like.
* *span* mode: two uniformly random token positions (StarCoder style).

A line boundary is the position right after a token whose text contains a newline; see
``newline_mask``. All randomness comes from the ``numpy.random.Generator`` the caller passes,
so a (seed, document) pair always gives the same output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model import formats


@dataclass(frozen=True)
class FIMConfig:
    fim_rate: float = 0.5  # share of documents that get the FIM transform
    spm_rate: float = 0.5  # share of FIM'd documents in SPM order (the rest PSM)
    line_rate: float = 0.5  # share of FIM'd documents cut on line boundaries

    def __post_init__(self) -> None:
        for name in ("fim_rate", "spm_rate", "line_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")


@dataclass(frozen=True)
class FIMTokens:
    """The special token ids the transform inserts."""

    prefix: int
    suffix: int
    middle: int
    eos: int
    pad: int = 0  # fills row tails the loader cannot use; the training loss ignores it

    @classmethod
    def from_tokenizer(cls, tok) -> FIMTokens:
        for name in ("fim_prefix", "fim_suffix", "fim_middle", "eos"):
            if name not in formats.SPECIAL_TOKENS:  # pragma: no cover - formats is fixed
                raise ValueError(f"model.formats has no special token {name!r}")
        return cls(
            prefix=int(tok.special_id("fim_prefix")),
            suffix=int(tok.special_id("fim_suffix")),
            middle=int(tok.special_id("fim_middle")),
            eos=int(tok.special_id("eos")),
            pad=int(tok.special_id("pad")),
        )


def newline_mask(tok, vocab_size: int | None = None) -> np.ndarray:
    """Boolean array over token ids: True where the token's text contains a newline.

    Uses ``tok.decode_bytes([i])`` (or ``tok.decode([i])``) per id, so byte-fallback pieces
    (``<0x0A>``) and merged pieces like ``"\\n    "`` are both found. Special tokens decode to
    nothing and are never newlines.
    """
    n = int(vocab_size if vocab_size is not None else tok.vocab_size)
    mask = np.zeros(n, dtype=bool)
    dec_bytes = getattr(tok, "decode_bytes", None)
    for i in range(n):
        try:
            text = dec_bytes([i]) if dec_bytes is not None else tok.decode([i]).encode("utf-8", "replace")
        except Exception:  # an id the tokenizer does not know: not a newline
            continue
        mask[i] = b"\n" in text
    return mask


def line_boundaries(doc: np.ndarray, nl_mask: np.ndarray) -> np.ndarray:
    """Sorted unique cut positions on line boundaries: 0, after every newline token, len(doc)."""
    n = len(doc)
    ids = np.asarray(doc, dtype=np.int64)
    ok = ids < len(nl_mask)
    after_nl = np.nonzero(ok & nl_mask[np.where(ok, ids, 0)])[0] + 1
    return np.unique(np.concatenate([[0], after_nl, [n]]).astype(np.int64))


def choose_cuts(n: int, rng: np.random.Generator, boundaries: np.ndarray | None = None) -> tuple[int, int]:
    """Two cut points ``0 <= i <= j <= n``.

    With ``boundaries`` (line mode) both cuts are boundaries and the middle spans ``k >= 1``
    whole lines: ``k = 1`` half the time, otherwise uniform over what is left.
    """
    if boundaries is None or len(boundaries) < 2:
        a, b = sorted(int(x) for x in rng.integers(0, n + 1, size=2))
        return a, b
    start = int(rng.integers(0, len(boundaries) - 1))
    left = len(boundaries) - 1 - start  # lines available after the start boundary
    k = 1 if (left == 1 or rng.random() < 0.5) else int(rng.integers(1, left + 1))
    return int(boundaries[start]), int(boundaries[start + k])


@dataclass(frozen=True)
class FIMPlan:
    """The per-document coin flips of the transform, drawn before any cut is chosen."""

    fim: bool
    spm: bool
    line: bool


def plan_fim(rng: np.random.Generator, cfg: FIMConfig) -> FIMPlan:
    """Draw (FIM or not, SPM or PSM, line or span mode) in a fixed order: three draws."""
    do_fim = rng.random() < cfg.fim_rate
    spm = rng.random() < cfg.spm_rate
    line_mode = rng.random() < cfg.line_rate
    return FIMPlan(bool(do_fim), bool(spm), bool(line_mode))


def fim_length(n: int) -> int:
    """Tokens of a FIM'd document of ``n`` tokens (three markers and the closing eos)."""
    return n + 4


def apply_fim(
    doc: np.ndarray,
    rng: np.random.Generator,
    special: FIMTokens,
    plan: FIMPlan,
    nl_mask: np.ndarray | None = None,
    *,
    end_with_eos: bool = True,
) -> np.ndarray:
    """``fim_transform`` with the coin flips already drawn (``plan_fim`` on the same ``rng``)."""
    doc = np.asarray(doc, dtype=np.int64)
    eos = np.array([special.eos], dtype=np.int64)
    if not plan.fim or len(doc) == 0:
        return np.concatenate([doc, eos]) if end_with_eos else doc
    bounds = line_boundaries(doc, nl_mask) if (plan.line and nl_mask is not None) else None
    i, j = choose_cuts(len(doc), rng, bounds)
    prefix, middle, suffix = doc[:i], doc[i:j], doc[j:]
    p, s, m = (np.array([t], dtype=np.int64) for t in (special.prefix, special.suffix, special.middle))
    if plan.spm:
        parts = [s, suffix, p, prefix, m, middle, eos]
    else:
        parts = [p, prefix, s, suffix, m, middle, eos]
    return np.concatenate(parts)


def fim_transform(
    doc: np.ndarray,
    rng: np.random.Generator,
    special: FIMTokens,
    cfg: FIMConfig,
    nl_mask: np.ndarray | None = None,
    *,
    end_with_eos: bool = True,
) -> np.ndarray:
    """Maybe FIM-transform one document (its tokens without the trailing eos).

    Returns int64 tokens. Untouched documents come back as ``doc`` (+ eos when
    ``end_with_eos``); FIM'd ones always end with eos, which closes the middle, and are
    ``fim_length(len(doc))`` tokens long.
    """
    # Every coin flip is drawn up front in a fixed order so the stream is stable.
    plan = plan_fim(rng, cfg)
    return apply_fim(doc, rng, special, plan, nl_mask, end_with_eos=end_with_eos)


def next_cut(
    doc: np.ndarray, start: int, max_len: int, nl_mask: np.ndarray | None = None, slack: int | None = None
) -> int:
    """End of the chunk of ``doc`` that starts at ``start`` and holds at most ``max_len`` tokens.

    The rest of the document when it fits; otherwise right after the last newline token in the
    last ``slack`` tokens of the window (default: its second half), so chunks hold whole lines;
    else a hard cut at ``max_len``.
    """
    if max_len <= 0:
        raise ValueError("max_len must be positive")
    n = len(doc)
    if n - start <= max_len:
        return n
    cut = start + max_len
    if nl_mask is not None:
        lo = cut - (max_len - max_len // 2 if slack is None else max(0, min(slack, max_len)))
        w = np.asarray(doc[lo:cut], dtype=np.int64)
        ok = w < len(nl_mask)
        hits = np.nonzero(ok & nl_mask[np.where(ok, w, 0)])[0]
        if len(hits):
            cut = lo + int(hits[-1]) + 1
    return cut


def split_long(doc: np.ndarray, max_len: int, nl_mask: np.ndarray | None = None) -> list[np.ndarray]:
    """Cut a long document into chunks of at most ``max_len`` tokens.

    Prefers to cut right after a newline token in the second half of the window so chunks
    hold whole lines; falls back to a hard cut.
    """
    doc = np.asarray(doc, dtype=np.int64)
    if max_len <= 0:
        raise ValueError("max_len must be positive")
    out, start = [], 0
    while True:
        cut = next_cut(doc, start, max_len, nl_mask)
        out.append(doc[start:cut])
        if cut == len(doc):
            return out
        start = cut
