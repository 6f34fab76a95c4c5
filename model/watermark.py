"""Watermarking generated code (SynthID-Text style tournament sampling) and its detector.

Generation (``Watermark`` + ``WatermarkState``, used by ``model.generate`` when
``SamplingParams.watermark`` is set; off by default):

* **g-values.** For a step whose last ``context`` (H) tokens are ``c``, a 32-bit seed is
  ``blake2b(key, c)``; layer ``l`` of the tournament gives every vocabulary token ``x`` a
  bit ``g_l(x) = fmix32(fmix32(seed ^ salt_l) ^ fmix32(x * K)) & 1`` (murmur3 finaliser,
  computed without overflow on int64 tensors). Same key + same context -> same bits,
  on any machine; another key -> independent bits.
* **Sampling (temperature > 0): tournament sampling.** ``2**m`` candidates drawn from the
  sampling distribution ``p`` (after temperature/top-k/top-p) play ``m`` knockout rounds;
  round ``l`` keeps the candidate with the larger ``g_l`` (ties: a fair coin). Drawing the
  winner is done exactly and without drawing candidates (SynthID-Text's vectorised form):
  each round maps ``p(x) -> p(x) * (1 + g_l(x) - G_l)`` with ``G_l = sum_y p(y) g_l(y)``;
  then one token is drawn. For speed the bits are computed for the ``sample_top`` (256)
  most likely tokens only; the others (a negligible mass at code temperatures) get the
  neutral value 1/2, which keeps the map a distribution and leaves them unmarked.
  Averaged over keys the output distribution is ``p`` itself
  (non-distortionary per step), but a token with high g-values is chosen more often than
  chance, which is the mark.
* **Greedy (temperature 0): keyed tie-break.** Candidates are the tokens whose logit is
  within ``greedy_margin`` (nats) of the best (at most ``greedy_top`` of them). With two or
  more, the one with the largest weighted g-score ``sum_l w_l g_l(x)`` wins (ties: the
  higher logit). It is deterministic per key and changes the output only where the model
  is nearly indifferent; with one candidate greedy is unchanged.
* **Skips.** A step is left alone (ordinary sampling) when (a) fewer than H tokens precede
  it, (b) its context window already occurred earlier in this generation (SynthID's
  repeated-context masking: a repeated context would reuse the same g-values and bias the
  text, and the detector could not count it as independent evidence), or (c) for
  sampling, the entropy of ``p`` is below ``min_entropy`` nats (no room for a mark).

Detection (``detect`` / ``moecoder watermark detect``) sees only text and the key. It
re-tokenises with the model's tokenizer and scores every token that has H tokens before
it in the text and whose context window was not seen earlier in the text. An entropy
filter is optional and computable from the text alone: ``rule`` drops tokens that are
whitespace or punctuation only; ``model`` recomputes each position's entropy with the
model over the text itself (no prompt) and drops positions below a threshold; ``none``
keeps all. The score is the weighted mean g-value, weights ``w_l = m - l + 1`` (early
rounds carry the most signal). Under the null (text not written with this key) each
scored token's g-values are fair independent bits, so the sum of ``n`` per-token scores has
an exactly known distribution (an ``n``-fold convolution, computed with one FFT); the
p-value is its upper tail. Fewer than ``min_tokens`` scored tokens: "too short to tell".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

M32 = 0xFFFFFFFF
_TOKEN_MULT = 0x27D4EB2F
_LAYER_SALT = 0x9E3779B9
DEFAULT_MIN_TOKENS = 24
ENTROPY_MODES = ("model", "rule", "none")


class WatermarkError(ValueError):
    """Bad watermark settings or input (one line, for the user)."""


@dataclass(frozen=True)
class Watermark:
    """Watermark settings. ``key`` is the secret; the others must match at detection."""

    key: str
    context: int = 4  # H: tokens of context hashed into the seed
    layers: int = 16  # m: tournament rounds
    min_entropy: float = 0.3  # nats: sampling steps below this are left alone
    greedy_margin: float = 0.5  # nats: greedy candidates within this of the best logit
    greedy_top: int = 8
    sample_top: int = 256  # g-values for the k most likely tokens; the rest get a neutral 1/2

    def validate(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise WatermarkError("watermark key must be a non-empty string")
        if not 1 <= self.context <= 64:
            raise WatermarkError("watermark context must be in 1..64")
        if not 1 <= self.layers <= 64:
            raise WatermarkError("watermark layers must be in 1..64")
        if self.min_entropy < 0 or self.greedy_margin < 0 or self.greedy_top < 1 or self.sample_top < 2:
            raise WatermarkError("watermark min_entropy and greedy_margin must be >= 0, greedy_top >= 1, "
                                 "sample_top >= 2")

    @property
    def weights(self) -> list[int]:
        return list(range(self.layers, 0, -1))


# --------------------------------------------------------------------------- hashing
def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for uint32 values held in int64, with no int64 overflow."""
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & M32


def _fmix(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser (a bijection with full avalanche)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def context_seed(key: str, context: Sequence[int]) -> int:
    """The 32-bit seed of one context window under ``key``."""
    data = key.encode("utf-8") + b"\x00" + b"".join(int(t).to_bytes(4, "little", signed=True) for t in context)
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little")


def g_values(seeds: Sequence[int] | torch.Tensor, tokens: torch.Tensor, layers: int) -> torch.Tensor:
    """g-bits [N, layers, K] (int64 0/1) for N seeds and tokens [K] (shared) or [N, K]."""
    s = torch.as_tensor(seeds, dtype=torch.long).reshape(-1, 1)
    salt = torch.tensor([((i + 1) * _LAYER_SALT) & M32 for i in range(layers)], dtype=torch.long)
    s = _fmix(s ^ salt[None, :])  # [N, L]
    t = _fmix(_mul32(tokens.to(torch.long) & M32, _TOKEN_MULT))
    t = t[None, None, :] if t.dim() == 1 else t[:, None, :]
    return (_fmix(s[:, :, None] ^ t) >> 11) & 1


# --------------------------------------------------------------------------- generation
def tournament_probs(probs: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The exact distribution of the winner of an m-round tournament: probs [B, V], g [B, m, V]."""
    p = probs
    gf = g.to(p.dtype)
    for lay in range(gf.shape[1]):
        gl = gf[:, lay]
        G = (p * gl).sum(-1, keepdim=True)
        p = p * (1.0 + gl - G)
    return p


def tournament_top(probs: torch.Tensor, top_i: torch.Tensor, g_top: torch.Tensor) -> torch.Tensor:
    """``tournament_probs`` where only the tokens ``top_i`` [B, k] have bits ``g_top`` [B, m, k] and
    every other token has the neutral g = 1/2: the same result in O(B*m*k) (the others share one
    factor per round)."""
    top = probs.gather(-1, top_i)
    rest = (1.0 - top.sum(-1, keepdim=True)).clamp_min(0)
    scale = torch.ones_like(rest)
    gf = g_top.to(probs.dtype)
    for lay in range(gf.shape[1]):
        gl = gf[:, lay]
        G = (top * gl).sum(-1, keepdim=True) + 0.5 * rest
        top = top * (1.0 + gl - G)
        rest = rest * (1.5 - G)
        scale = scale * (1.5 - G)
    return (probs * scale).scatter(-1, top_i, top)


class WatermarkState:
    """Per-generation state: each row's recent tokens and the context windows already used."""

    def __init__(self, wm: Watermark, prompts: Sequence[Sequence[int]]):
        wm.validate()
        self.wm = wm
        self.hist = [list(p[-wm.context:]) for p in prompts]
        self.seen: list[set[tuple[int, ...]]] = [set() for _ in prompts]
        self.steps = 0
        self.marked = 0  # steps where the mark changed the distribution (or the greedy choice set)

    def _eligible(self) -> list[tuple[int, int]]:
        """(row, seed) of rows whose context is full and new; records the context as used."""
        out = []
        H = self.wm.context
        for b, h in enumerate(self.hist):
            if len(h) < H:
                continue
            ctx = tuple(h[-H:])
            if ctx in self.seen[b]:
                continue
            self.seen[b].add(ctx)
            out.append((b, context_seed(self.wm.key, ctx)))
        return out

    def sample(self, logits: torch.Tensor, params, gen: torch.Generator | None, probs_fn) -> torch.Tensor:
        """Token ids [B] from logits [B, V]; ``probs_fn(logits, params)`` is the sampling distribution."""
        elig = self._eligible()
        self.steps += len(self.hist)
        if params.temperature <= 0:
            ids = logits.argmax(-1)
            if not elig:
                return ids
            k = min(self.wm.greedy_top, logits.shape[-1])
            top_v, top_i = logits[[b for b, _ in elig]].float().topk(k, dim=-1)
            g = g_values([s for _, s in elig], top_i, self.wm.layers)  # [E, L, k]
            w = torch.tensor(self.wm.weights, dtype=torch.long)
            score = (g * w[None, :, None]).sum(1)  # [E, k]
            near = top_v >= top_v[:, :1] - self.wm.greedy_margin
            score = torch.where(near, score, torch.full_like(score, -1))
            pick = score.argmax(-1)  # first max = the higher logit among equal scores
            for j, (b, _) in enumerate(elig):
                if int(near[j].sum()) > 1:
                    self.marked += 1
                    ids[b] = top_i[j, pick[j]]
            return ids
        probs = probs_fn(logits, params)
        if elig:
            rows = torch.tensor([b for b, _ in elig])
            p = probs[rows]
            ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
            keep = ent >= self.wm.min_entropy
            if bool(keep.any()):
                sel = rows[keep]
                seeds = [s for (_, s), k in zip(elig, keep.tolist()) if k]
                ps = probs[sel]
                k = min(self.wm.sample_top, ps.shape[-1])
                top_i = ps.topk(k, dim=-1).indices
                probs = probs.clone()
                probs[sel] = tournament_top(ps, top_i, g_values(seeds, top_i, self.wm.layers)).clamp_min(0)
                self.marked += len(seeds)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    def push(self, ids: Sequence[int]) -> None:
        H = self.wm.context
        for b, t in enumerate(ids):
            h = self.hist[b]
            h.append(int(t))
            if len(h) > H:
                del h[0]


# --------------------------------------------------------------------------- null distribution
def _token_pmf(weights: Sequence[int]) -> list[float]:
    """PMF of sum_l w_l * Bernoulli(1/2) over 0..sum(w)."""
    pmf = [1.0]
    for w in weights:
        new = [0.0] * (len(pmf) + w)
        for i, v in enumerate(pmf):
            new[i] += v / 2
            new[i + w] += v / 2
        pmf = new
    return pmf


def p_value(total: int, n: int, weights: Sequence[int]) -> float:
    """P(S >= total) where S is the sum of n iid per-token weighted scores under the null."""
    import numpy as np

    if n <= 0:
        return 1.0
    pmf1 = np.array(_token_pmf(weights))
    size = n * (len(pmf1) - 1) + 1
    if total <= 0:
        return 1.0
    if total > size - 1:
        return 0.0
    nfft = 1 << (size - 1).bit_length()
    f = np.fft.rfft(pmf1, nfft)
    pmf = np.fft.irfft(f ** n, nfft)[:size]
    tail = float(np.clip(pmf[total:], 0, None).sum())
    if tail > 1e-12:
        return min(1.0, tail)
    # beyond the FFT's precision: a Chernoff-free normal tail (only ever tiny)
    mu = n * sum(weights) / 2
    sd = math.sqrt(n * sum(w * w for w in weights) / 4)
    return min(1e-12, 0.5 * math.erfc((total - 0.5 - mu) / (sd * math.sqrt(2))))


# --------------------------------------------------------------------------- detection
_PUNCT_ONLY = re.compile(r"^[\s()\[\]{}:,.;=+\-*/%<>!&|^~@'\"\\`]*$")


@dataclass
class TokenScores:
    """Per scorable token of a text: position, weighted g-score, and whether a rule would skip it."""

    positions: list[int] = field(default_factory=list)
    scores: list[int] = field(default_factory=list)
    g_mean: list[float] = field(default_factory=list)
    trivial: list[bool] = field(default_factory=list)  # whitespace/punctuation only
    entropy: list[float] | None = None  # model-recomputed, when computed
    n_ids: int = 0  # tokens in the text


@dataclass
class Detection:
    n_tokens: int  # tokens in the text
    n_scored: int
    score: float  # weighted mean g-value, 0.5 expected without the watermark
    z: float
    p_value: float
    verdict: str  # "watermarked" | "not watermarked" | "too short to tell"


def score_tokens(ids: Sequence[int], wm: Watermark, tok=None) -> TokenScores:
    """g-scores of every token with a full, first-seen context window in ``ids``."""
    wm.validate()
    H = wm.context
    seen: set[tuple[int, ...]] = set()
    pos, seeds = [], []
    for t in range(H, len(ids)):
        ctx = tuple(ids[t - H:t])
        if ctx in seen:
            continue
        seen.add(ctx)
        pos.append(t)
        seeds.append(context_seed(wm.key, ctx))
    out = TokenScores(positions=pos, n_ids=len(ids))
    if not pos:
        return out
    toks = torch.tensor([ids[t] for t in pos], dtype=torch.long)[:, None]
    g = g_values(seeds, toks, wm.layers)[:, :, 0]  # [N, L]
    w = torch.tensor(wm.weights, dtype=torch.long)
    out.scores = (g * w).sum(-1).tolist()
    out.g_mean = g.float().mean(-1).tolist()
    if tok is not None:
        out.trivial = [bool(_PUNCT_ONLY.match(tok.decode([ids[t]]))) for t in pos]
    return out


@torch.inference_mode()
def model_entropies(model, ids: Sequence[int], bos: int) -> list[float]:
    """Entropy (nats, temperature 1) of the model's next-token distribution before each id,
    given only the preceding text (``bos`` first); long texts in overlapping windows."""
    seq = [bos, *ids]
    ctx = int(model.cfg.max_seq_len)
    out: list[float] = []
    start = 0
    while start < len(ids):
        a = max(0, start + 1 - ctx // 2) if start else 0
        b = min(len(seq) - 1, a + ctx)
        x = torch.tensor([seq[a:b]], dtype=torch.long, device=model.tok_emb.weight.device)
        logp = model(x).float().log_softmax(-1)[0]
        ent = -(logp.exp() * logp).sum(-1)
        # ent[j] is the entropy before seq[a + j + 1] = ids[a + j]
        out += ent[start - a:].tolist()
        start = a + len(ent)
    return out[:len(ids)]


def decide(ts: TokenScores, wm: Watermark, entropy: str = "none", min_entropy: float = 1.0,
           min_tokens: int = DEFAULT_MIN_TOKENS, alpha: float = 0.01, limit: int | None = None) -> Detection:
    """Score the kept tokens (optionally only positions < ``limit``) and test against the null."""
    keep = []
    for i, t in enumerate(ts.positions):
        if limit is not None and t >= limit:
            break
        if entropy == "rule" and ts.trivial and ts.trivial[i]:
            continue
        if entropy == "model" and ts.entropy is not None and ts.entropy[i] < min_entropy:
            continue
        keep.append(ts.scores[i])
    n, W = len(keep), sum(wm.weights)
    n_tokens = ts.n_ids if limit is None else min(ts.n_ids, limit)
    if n == 0:
        return Detection(n_tokens, 0, 0.5, 0.0, 1.0, "too short to tell")
    total = sum(keep)
    mu, var = n * W / 2, n * sum(w * w for w in wm.weights) / 4
    z = (total - mu) / math.sqrt(var)
    p = p_value(total, n, wm.weights)
    if n < min_tokens:
        verdict = "too short to tell"
    else:
        verdict = "watermarked" if p <= alpha else "not watermarked"
    return Detection(n_tokens, n, total / (n * W), z, p, verdict)


class Detector:
    """Scores texts for one key; ``model`` is needed only for ``entropy="model"``."""

    def __init__(self, wm: Watermark, tok, model=None, entropy: str = "model", min_entropy: float = 1.0,
                 min_tokens: int = DEFAULT_MIN_TOKENS, alpha: float = 0.01):
        if entropy not in ENTROPY_MODES:
            raise WatermarkError(f"entropy filter must be one of {', '.join(ENTROPY_MODES)}")
        if entropy == "model" and model is None:
            raise WatermarkError("the model entropy filter needs the model")
        wm.validate()
        self.wm, self.tok, self.model = wm, tok, model
        self.entropy, self.min_entropy, self.min_tokens, self.alpha = entropy, min_entropy, min_tokens, alpha

    def token_scores(self, text: str) -> TokenScores:
        ids = self.tok.encode(text)
        ts = score_tokens(ids, self.wm, self.tok)
        if self.model is not None and self.entropy == "model" and ts.positions:
            ent = model_entropies(self.model, ids, self.tok.eos_id)
            ts.entropy = [ent[t] for t in ts.positions]
        return ts

    def detect(self, text: str) -> Detection:
        return decide(self.token_scores(text), self.wm, self.entropy, self.min_entropy, self.min_tokens,
                      self.alpha)


# --------------------------------------------------------------------------- functions of a file
_DEF = re.compile(r"^(\s*)(?:async\s+)?def\s+([A-Za-z_]\w*)")


def functions(text: str) -> list[tuple[str, int, int, str]]:
    """(name, first line, last line, source) of every ``def`` not nested in another function
    (methods included), by indentation, so it also works on code that does not parse."""
    lines = text.split("\n")
    out = []
    i = 0
    inside: int | None = None  # indentation of the function we are in
    while i < len(lines):
        m = _DEF.match(lines[i])
        if m and (inside is None or len(m.group(1)) <= inside):
            indent = len(m.group(1))
            j, depth = i, 0
            while j < len(lines):  # the signature may span lines
                depth += lines[j].count("(") + lines[j].count("[") - lines[j].count(")") - lines[j].count("]")
                j += 1
                if depth <= 0:
                    break
            while j < len(lines):
                s = lines[j]
                if s.strip() and len(s) - len(s.lstrip()) <= indent:
                    break
                j += 1
            while j > i + 1 and not lines[j - 1].strip():
                j -= 1
            out.append((m.group(2), i + 1, j, "\n".join(lines[i:j]) + "\n"))
            i = j
            continue
        i += 1
    return out


# --------------------------------------------------------------------------- CLI
def _load_tokenizer(model_dir):
    """Only the tokenizer of a model directory (no weights are read)."""
    from model.checkpoint import TOKENIZER, CheckpointError, default_model_dir, read_config
    from model.tokenizer import Tokenizer

    d = default_model_dir() if model_dir is None else Path(model_dir)
    _, meta = read_config(d)
    path = d / str(meta.get("tokenizer", TOKENIZER))
    try:
        return Tokenizer.load(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: {str(e).splitlines()[0] if str(e) else 'cannot load'}") from None


def main(argv: Sequence[str] | None = None) -> int:
    from model.cli_args import watermark_parser

    return run(watermark_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``moecoder watermark detect`` with parsed arguments."""
    err = lambda msg: print(f"moecoder watermark: error: {msg}", file=sys.stderr) or 2  # noqa: E731
    if not 0 < args.alpha < 1:
        return err("--alpha must be in (0, 1)")
    if args.min_tokens < 1:
        return err("--min-tokens must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            return err("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    wm = Watermark(args.key, context=args.context, layers=args.layers)
    texts = []
    for f in args.files:
        try:
            texts.append((f, Path(f).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            return err(f"{f}: cannot read: {e.strerror if isinstance(e, OSError) else 'not UTF-8'}")
    from model.checkpoint import CheckpointError, load_model

    try:
        if args.entropy == "model":
            loaded = load_model(args.model)
            tok, model = loaded.tokenizer, loaded.model
        else:
            tok, model = _load_tokenizer(args.model), None
        det = Detector(wm, tok, model, args.entropy, args.min_entropy, args.min_tokens, args.alpha)
    except (CheckpointError, WatermarkError) as e:
        return err(e)
    for f, text in texts:
        units = [(f, text)]
        if args.per_function:
            units = [(f"{f}:{a}-{b} {name}", src) for name, a, b, src in functions(text)]
            if not units:
                print(f"{f}: no functions", file=sys.stderr)
        for label, src in units:
            r = det.detect(src)
            if args.json:
                print(json.dumps({"target": label, **asdict(r)}))
            elif r.verdict == "too short to tell":
                print(f"{label}: too short to tell ({r.n_scored} scored tokens < {args.min_tokens})")
            else:
                print(f"{label}: {r.verdict}  score {r.score:.3f}  z {r.z:.2f}  p {r.p_value:.3g}  "
                      f"({r.n_scored} of {r.n_tokens} tokens scored)")
    return 0
