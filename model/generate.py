"""Text generation: prefill + decode with the KV cache, sampling, streaming, stop strings, FIM.

``stream`` yields one ``TokenEvent`` per generated token; ``.text`` is the decoded delta
(UTF-8 safe; text that could be the start of a stop string is held back until it is not,
and a stop string is never emitted). The concatenated deltas equal ``GenerationResult.text``.
The final stop token (eos or a ``stop_token_ids`` entry) is included in ``token_ids`` with
empty text. ``logprob`` is log p(token) under the model itself (temperature 1, no filtering),
which is what ranking by surprise needs.
"""

from __future__ import annotations

import codecs
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model import static_decode
from model.cancel import CancelToken  # noqa: F401  (re-exported: the interface names it here)
from model.cli_args import generate_parser as _parser  # torch-free, for a fast `--help`
from model.formats import FimEnd, fim_prompt, fim_suffix_stop
from model.repetition import LoopGuard
from model.transformer import Transformer

PREFILL_CHUNK = 512  # prompt tokens per forward on the CPU (bounds the attention's memory)
GPU_PREFILL_CHUNK = 8192  # on a GPU each chunk costs a whole forward's launches, and a later chunk's
# attention takes a mask (SDPA's slower kernels): fewer, longer ones. 4096 made an 8k prefill of
# Qwen3-30B-A3B 24% slower than one forward (H200, docs/benchmarks.md)


def prefill_chunk(device: torch.device | str) -> int:
    """Prompt tokens per prefill forward: ``MOECODER_PREFILL_CHUNK`` or the device's default."""
    env = os.environ.get("MOECODER_PREFILL_CHUNK", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"MOECODER_PREFILL_CHUNK must be a positive integer; got {env!r}")
        return int(env)
    return PREFILL_CHUNK if torch.device(device).type == "cpu" else GPU_PREFILL_CHUNK


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_strings: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    max_seconds: float | None = None
    seed: int | None = None
    watermark: Any = None  # a model.watermark.Watermark (its key switches it on); None = off
    loop_guard: int = 0  # > 0: no unit of <= N tokens three times in a row (model/repetition.py)
    heal: str = ""  # token healing: the output must begin with this text (the word typed at the cursor)
    beams: int = 1  # > 1: beam search of this width (greedy only, one prompt at a time; short answers)
    # beam search: rerank(model, answers) -> one extra score per finished answer (its token ids),
    # added to the length-normalised log-probability when the best is picked (assistant.tasks
    # scores a completion's line with the code after it; see continuation_logprobs)
    rerank: Callable[[Transformer, list[list[int]]], list[float]] | None = None
    # mix(logits [B, V], head input [B, D]) -> the logits each step picks from (the model's
    # final-norm output at that position; e.g. assistant.memory's kNN over the user's project).
    # Eager steps only: no CUDA graph while it is set.
    mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")
        if self.max_seconds is not None and self.max_seconds < 0:
            raise ValueError("max_seconds must be >= 0")
        if self.watermark is not None:
            self.watermark.validate()
        if self.loop_guard < 0:
            raise ValueError("loop_guard must be >= 0")
        if self.beams < 1:
            raise ValueError("beams must be >= 1")


@dataclass
class TokenEvent:
    token_id: int
    text: str
    logprob: float


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "stop" | "length" | "time" | "cancelled" | "repeat"
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the previous generation (PrefixKV)


class Healer:
    """Token healing: the prompt stops before the word typed at the cursor (a token boundary
    the model knows); the first generated tokens are held to spelling that word again, so the
    model picks how to tokenize it and goes on from there (``text.sp`` -> ``text.split(...)``)."""

    _pieces: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> bytes of every id
    _shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> recent masks
    MASKS_KEPT = 256
    _lock = threading.Lock()

    def __init__(self, tok, text: str, vocab: int):
        self.need = text.encode("utf-8")
        # healed indentation: the cursor's indentation is the line's, so the code follows it
        # directly (no token may add more spaces or tabs after it)
        self.indent = bool(text) and not text.strip()
        self.pieces = self._pieces.get(tok)
        if self.pieces is None or len(self.pieces) != vocab:  # once per tokenizer, not per completion
            table = getattr(tok, "_table", None)
            self.pieces = [bytes(table[i]) if table is not None and i < len(table) else tok.decode([i]).encode()
                           for i in range(vocab)]
            self._pieces[tok] = self.pieces
        # masks are kept across completions (the same indentation and words come back as the user types)
        with self._lock:
            self._masks: OrderedDict = self._shared.setdefault(tok, OrderedDict())

    def allowed(self, produced: list[int], device) -> torch.Tensor | None:
        done = b"".join(self.pieces[t] for t in produced if t < len(self.pieces))
        if len(done) > len(self.need) or (len(done) == len(self.need) and not self.indent):
            return None
        rest = self.need[len(done):]
        key = (rest, self.indent, str(device), len(self.pieces))
        with self._lock:
            mask = self._masks.get(key)
            if mask is not None:
                self._masks.move_to_end(key)
        if mask is None:
            # a piece spelling part of what is left, or all of it and then more
            ok = [i for i, p in enumerate(self.pieces) if p and ((rest and rest.startswith(p)) or self._goes_on(p, rest))]
            if not ok:  # nothing spells it: leave the model free
                return None
            mask = torch.zeros(len(self.pieces), dtype=torch.bool, device=device)
            mask[ok] = True
            with self._lock:
                self._masks[key] = mask
                while len(self._masks) > self.MASKS_KEPT:
                    self._masks.popitem(last=False)
        return mask

    def _goes_on(self, piece: bytes, rest: bytes) -> bool:
        """A piece that spells ``rest`` and carries on past it (after indentation: not with blanks)."""
        if not piece.startswith(rest):
            return False
        return not self.indent or (len(piece) > len(rest) and piece[len(rest):len(rest) + 1] not in (b" ", b"\t"))


# --------------------------------------------------------------------------- prefix reuse
def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixKV:
    """The last single-prompt generation's KV cache, kept per model for the next prompt that
    starts the same way. An editor asks for a completion at nearly every keystroke in one file:
    the prompt (file window, suffix, prefix up to the healed word) is then the same up to its
    last few tokens, and only those are prefilled again. Eager path only (CPU; the CUDA-graph
    decoders keep their own caches); ``MOECODER_PREFIX_CACHE=0`` turns it off. One generation
    holds the cache at a time: a concurrent one prefills from scratch. The entry is dropped when
    the weights change in place (``moecoder tune`` trains the model it scores)."""

    MAX_BYTES = 256 << 20  # a longer cache than this is not kept (open checkpoints, long contexts)
    _entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _guard = threading.Lock()

    def __init__(self):
        self.lock = threading.Lock()
        self.cache = None
        self.ids: list[int] = []
        self.version: Any = None
        self.per_position = 0  # bytes of keys + values per cached position

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("MOECODER_PREFIX_CACHE", "1").strip() not in ("0", "off", "false")

    @staticmethod
    def _version(model) -> Any:
        try:  # in-place updates bump a parameter's version counter
            return sum(p._version for p in model.parameters())
        except RuntimeError:  # inference tensors have none, and cannot change outside inference mode
            return 0

    @classmethod
    def take(cls, model, prompt: Sequence[int], total: int, device) -> tuple[PrefixKV, int] | None:
        """(the entry, now held, its cache at least ``total`` long; how many leading prompt tokens
        are already in it), or None: caching is off, the model trains, or the entry is busy."""
        if not cls.enabled() or model.training:
            return None
        with cls._guard:
            entry = cls._entries.get(model)
            if entry is None:
                entry = cls._entries[model] = cls()
        if not entry.lock.acquire(blocking=False):
            return None
        try:
            version = cls._version(model)
            old = entry.cache
            if old is not None and (entry.version != version or old.k[0].device != torch.device(device)
                                    or old.k[0].dtype != model.tok_emb.weight.dtype):
                old, entry.ids = None, []
            reuse = min(_common_prefix(entry.ids, prompt), len(prompt) - 1) if old is not None else 0
            if old is None or old.max_len < total:
                if not entry.per_position:
                    probe = model.setup_cache(1, 1, device=device)
                    entry.per_position = sum(t.numel() * t.element_size() for t in (*probe.k, *probe.v))
                fits = cls.MAX_BYTES // entry.per_position  # positions the byte budget allows
                if total > fits:  # this generation's cache would be too large to keep
                    entry.cache, entry.ids = None, []
                    entry.lock.release()
                    return None
                grown = 2 * old.max_len if old is not None else 256  # grow by doubling, not per request
                new = model.setup_cache(1, min(model.cfg.max_seq_len, fits, max(total, grown)), device=device)
                for dst, src in zip((*new.k, *new.v), (*old.k, *old.v)) if old is not None and reuse else ():
                    dst[:, :, :reuse] = src[:, :, :reuse]
                entry.cache = new
            entry.cache.set_padding(None)
            entry.version, entry.ids = version, []  # nothing counts as cached until release()
            return entry, reuse
        except BaseException:
            entry.lock.release()
            raise

    def release(self, ids: Sequence[int]) -> None:
        """Give the entry back; ``ids`` = the tokens whose keys/values are now in positions 0..n-1."""
        self.ids = list(ids)
        self.lock.release()


# --------------------------------------------------------------------------- text state
class _Text:
    """Per-row incremental decoding with stop-string hold-back."""

    def __init__(self, tok, stops: Sequence[str]):
        self.tok, self.stops = tok, tuple(stops)
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.held = ""
        self.parts: list[str] = []

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text to emit, hit a stop string)."""
        pending = self.held + self.dec.decode(self.tok.decode_bytes([token_id]))
        if self.stops:
            hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
            if hits:
                return self._emit(pending[:min(hits)], ""), True
            hold = 0
            for s in self.stops:
                for n in range(min(len(s) - 1, len(pending)), hold, -1):
                    if pending.endswith(s[:n]):
                        hold = n
                        break
            return self._emit(pending[:len(pending) - hold], pending[len(pending) - hold:]), False
        return self._emit(pending, ""), False

    def flush(self) -> str:
        return self._emit(self.held + self.dec.decode(b"", final=True), "")

    def _emit(self, text: str, held: str) -> str:
        self.held = held
        self.parts.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.parts)


# --------------------------------------------------------------------------- sampling
def sample(logits_BV: torch.Tensor, params: SamplingParams, gen: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B] from float32 logits [B, V]: greedy, or temperature + top-k + top-p."""
    if params.temperature <= 0:
        return logits_BV.argmax(-1)
    return torch.multinomial(sampling_probs(logits_BV, params), 1, generator=gen).squeeze(-1)


def sampling_probs(logits_BV: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution [B, V] that temperature (> 0) + top-k + top-p sampling draws from."""
    logits = logits_BV / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def _generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


# --------------------------------------------------------------------------- the decode loop
class _Mixer:
    """``SamplingParams.mix`` applied to the last position of each forward: the head's input is
    caught by a hook on the model's final norm."""

    def __init__(self, model: Transformer, mix):
        self.mix, self.h = mix, None
        self._hook = model.norm.register_forward_hook(self._keep)

    def _keep(self, _module, _args, out) -> None:
        self.h = out

    def __call__(self, last_BV: torch.Tensor) -> torch.Tensor:
        return self.mix(last_BV, self.h[:, -1])

    def close(self) -> None:
        self._hook.remove()


def _check(model: Transformer, prompts: list[list[int]], params: SamplingParams) -> None:
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest, ctx = max(len(p) for p in prompts), model.cfg.max_seq_len
    if longest >= ctx:
        raise ValueError(f"prompt of {longest} tokens does not fit the context length {ctx}")


def _decode(model: Transformer, tok, prompts: list[list[int]], params: SamplingParams,
            cancel: CancelToken | None, results: list[GenerationResult]) -> Iterator[list[tuple[int, TokenEvent]]]:
    """Generate for every prompt at once (left padded); yields the events of each step."""
    _check(model, prompts, params)
    if params.beams > 1 and params.temperature <= 0 and params.watermark is None:
        if len(prompts) != 1:
            raise ValueError("beam search takes one prompt at a time")
        yield from _beam_decode(model, tok, list(prompts[0]), params, cancel, results[0])
        return
    ctx = model.cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    B = len(prompts)
    device = model.tok_emb.weight.device
    total = min(ctx, longest + params.max_new_tokens)
    pad_id = getattr(tok, "pad_id", 0)  # < 0: no pad token (open checkpoints); rows are masked anyway
    rows = [[max(pad_id, 0)] * (longest - len(p)) + list(p) for p in prompts]
    x = torch.tensor(rows, dtype=torch.long, device=device)
    stop_ids = {int(tok.eos_id), *map(int, params.stop_token_ids), *getattr(tok, "stop_ids", ())}
    texts = [_Text(tok, params.stop_strings) for _ in range(B)]
    active = [True] * B
    for r in results:
        r.text, r.token_ids, r.logprobs, r.finish_reason, r.cached_tokens = "", [], [], "length", 0
    gen = _generator(params, device)
    vocab = min(int(tok.vocab_size), model.cfg.vocab_size)
    wm = None
    if params.watermark is not None:  # model/watermark.py: tournament sampling / keyed greedy tie-break
        from model.watermark import WatermarkState

        wm = WatermarkState(params.watermark, prompts)
    guard = LoopGuard(tok, params.loop_guard) if params.loop_guard else None
    healer = Healer(tok, params.heal, vocab) if params.heal else None
    t0 = time.monotonic()

    pads = [longest - len(p) for p in prompts]
    # On a GPU the decode steps replay a CUDA graph over a static cache (model/static_decode.py).
    dec = static_decode.acquire(model, B, total, padded=any(pads)) if params.mix is None else None
    mixer = _Mixer(model, params.mix) if params.mix is not None else None
    held, start, fed = None, 0, 0  # PrefixKV entry; prompt tokens it already holds; tokens written
    if dec is None:
        taken = PrefixKV.take(model, prompts[0], total, device) if B == 1 else None
        if taken is not None:
            held, start = taken
            cache = held.cache
            results[0].cached_tokens = start
        else:
            cache = model.setup_cache(B, total, device=device)
            cache.set_padding(pads)
    else:
        dec.begin(pads)
        cache = dec.cache
    try:
        chunk = prefill_chunk(device)
        fed = start
        for a in range(start, longest, chunk):
            if cancel is not None and cancel.cancelled:  # also between prefill chunks of a long prompt
                for r in results:
                    r.finish_reason = "cancelled"
                return
            if dec is not None:  # the first chunk replays a captured prefill (model/static_decode.py)
                logits = dec.prefill(model, x[:, a:a + chunk], a)
            else:
                logits = model(x[:, a:a + chunk], a, cache, last_only=True)
            fed = min(a + chunk, longest)
        last = logits[:, -1] if mixer is None else mixer(logits[:, -1])
        pos = longest
        while True:
            allowed = last[:, :vocab].clone()  # ids the tokenizer can decode, never padding
            if 0 <= pad_id < vocab:
                allowed[:, pad_id] = float("-inf")
            if healer is not None:  # the first tokens spell the text typed at the cursor, then anything
                for b in range(B):
                    if active[b] and (keep := healer.allowed(results[b].token_ids, allowed.device)) is not None:
                        allowed[b].masked_fill_(~keep, float("-inf"))
            if guard is not None:  # the token that would make a loop's third copy is not an option
                for b in range(B):
                    if active[b] and (ban := [t for t in guard.banned(results[b].token_ids) if t < vocab]):
                        allowed[b, ban] = float("-inf")
            ids = sample(allowed, params, gen) if wm is None else wm.sample(allowed, params, gen, sampling_probs)
            lps = last.log_softmax(-1).gather(-1, ids[:, None]).squeeze(-1)
            ids_l, lps_l = ids.tolist(), lps.tolist()
            if wm is not None:
                wm.push(ids_l)
            out_of_time = params.max_seconds is not None and time.monotonic() - t0 >= params.max_seconds
            step: list[tuple[int, TokenEvent]] = []
            for b in range(B):
                if not active[b]:
                    continue
                t, lp, res, txt = ids_l[b], lps_l[b], results[b], texts[b]
                res.token_ids.append(t)
                res.logprobs.append(lp)
                if t in stop_ids:
                    delta, reason = txt.flush(), "eos" if t == tok.eos_id else "stop"
                else:
                    delta, hit = txt.push(t)
                    reason = "stop" if hit else None
                    if reason is None and guard is not None and "\n" in delta and guard.repeated_block(txt.text):
                        reason = "repeat"  # the same block of lines twice in a row: a loop the token ban cannot break
                    if reason is None and (len(res.token_ids) >= params.max_new_tokens or pos + 1 >= total):
                        reason = "length"
                    if reason is None and out_of_time:
                        reason = "time"
                    if reason in ("length", "time"):
                        delta += txt.flush()
                if reason is not None:
                    active[b] = False
                    res.finish_reason = reason
                res.text = txt.text
                step.append((b, TokenEvent(t, delta, lp)))
            yield step
            if not any(active):
                return
            if cancel is not None and cancel.cancelled:
                for b in range(B):
                    if active[b]:
                        results[b].finish_reason = "cancelled"
                return
            last = model(ids[:, None], pos, cache)[:, -1] if dec is None else dec.step(model, ids, pos)
            if mixer is not None:
                last = mixer(last)
            pos += 1
            fed = pos
    finally:
        if mixer is not None:
            mixer.close()
        if dec is not None:
            dec.end()
        if held is not None:  # what the cache now holds, for the next prompt that starts the same way
            held.release([*prompts[0], *results[0].token_ids][:fed])


# --------------------------------------------------------------------------- beam search
BEAM_LENGTH_ALPHA = 0.5  # a finished answer's score: sum of log-probabilities / tokens ** alpha


def _beam_decode(model: Transformer, tok, prompt: list[int], params: SamplingParams,
                 cancel: CancelToken | None, result: GenerationResult) -> Iterator[list[tuple[int, TokenEvent]]]:
    """Beam search for a short answer (a completion's line): the ``params.beams`` most likely
    partial answers are extended together, one cache row each; an answer is finished by a stop
    token, a stop string or the length limit, and the search ends once ``beams`` answers are
    finished. The best finished one (log-probability / tokens ** ``BEAM_LENGTH_ALPHA``) is
    emitted at the end, one event per token, exactly as the greedy loop would have emitted it.
    The prompt's keys/values are shared by every row (written once, from the ``PrefixKV``
    entry when it has them); only the answers' positions are reordered as beams are chosen."""
    W = params.beams
    device = model.tok_emb.weight.device
    P = len(prompt)
    total = min(model.cfg.max_seq_len, P + params.max_new_tokens)
    stop_ids = {int(tok.eos_id), *map(int, params.stop_token_ids), *getattr(tok, "stop_ids", ())}
    vocab = min(int(tok.vocab_size), model.cfg.vocab_size)
    pad_id = getattr(tok, "pad_id", 0)
    healer = Healer(tok, params.heal, vocab) if params.heal else None
    result.text, result.token_ids, result.logprobs, result.finish_reason, result.cached_tokens = "", [], [], "length", 0
    t0 = time.monotonic()
    taken = PrefixKV.take(model, prompt, total, device)
    held, start = taken if taken is not None else (None, 0)
    rows = model.setup_cache(W, total, device=device)  # one row per beam, the prompt in each
    cache = held.cache if held is not None else rows.head(1)  # the prompt is prefilled here
    result.cached_tokens, fed = start, start
    x = torch.tensor([prompt], dtype=torch.long, device=device)
    mixer = _Mixer(model, params.mix) if params.mix is not None else None
    try:
        chunk = prefill_chunk(device)
        for a in range(start, P, chunk):
            if cancel is not None and cancel.cancelled:
                result.finish_reason = "cancelled"
                return
            logits = model(x[:, a:a + chunk], a, cache, last_only=True)
            fed = min(a + chunk, P)
        last = logits[:, -1] if mixer is None else mixer(logits[:, -1])
        first = 0 if held is not None else 1  # rows still without the prompt
        for dst, src in zip((*rows.k, *rows.v), (*cache.k, *cache.v)):
            dst[first:, :, :P] = src[:, :, :P]
        if held is not None:  # the prompt is copied out: the entry is free for the next request
            held.release(prompt[:fed])
            held = None
        live: list[tuple[list[int], list[float], float]] = [([], [], 0.0)]  # tokens, log-probs, their sum
        done: list[tuple[list[int], list[float], float, str]] = []
        pos = P
        while True:
            logp = last.log_softmax(-1)  # reported log-probabilities: the model's own (as the greedy loop)
            allowed = logp[:, :vocab].clone()
            if 0 <= pad_id < vocab:
                allowed[:, pad_id] = float("-inf")
            cands = []
            for b, (toks, _, score) in enumerate(live):
                row = allowed[b]
                if healer is not None and (keep := healer.allowed(toks, row.device)) is not None:
                    row = row.masked_fill(~keep, float("-inf"))
                top = row.topk(min(W, vocab))
                cands += [(score + v, b, t) for v, t in zip(top.values.tolist(), top.indices.tolist())
                          if v != float("-inf")]
            cands.sort(key=lambda c: -c[0])
            nxt, parents = [], []
            for score, b, t in cands:
                toks, lps = [*live[b][0], t], [*live[b][1], float(logp[b, t])]
                if t in stop_ids:
                    done.append((toks, lps, score, "eos" if t == tok.eos_id else "stop"))
                elif params.stop_strings and any(s in _decoded(tok, toks) for s in params.stop_strings):
                    done.append((toks, lps, score, "stop"))
                elif len(toks) >= params.max_new_tokens or pos + 1 >= total:
                    done.append((toks, lps, score, "length"))
                else:
                    nxt.append((toks, lps, score))
                    parents.append(b)
                    if len(nxt) == W:
                        break
            if len(done) >= W or not nxt:
                break
            if cancel is not None and cancel.cancelled:
                result.finish_reason = "cancelled"
                return
            if params.max_seconds is not None and time.monotonic() - t0 >= params.max_seconds:
                done += [(toks, lps, score, "time") for toks, lps, score in nxt]
                break
            n = len(nxt)
            if pos > P:  # each row takes its parent's answer so far
                idx = torch.tensor(parents, device=device)
                for t in (*rows.k, *rows.v):
                    t[:n, :, P:pos] = t[idx, :, P:pos]
            ids = torch.tensor([[toks[-1]] for toks, _, _ in nxt], dtype=torch.long, device=device)
            last = model(ids, pos, rows.head(n))[:, -1]
            if mixer is not None:
                last = mixer(last)
            pos += 1
            live = nxt
        if not done:
            return
        extra = params.rerank(model, [d[0] for d in done]) if params.rerank is not None and len(done) > 1 else None
        best = max(range(len(done)), key=lambda i: done[i][2] / len(done[i][0]) ** BEAM_LENGTH_ALPHA
                   + (extra[i] if extra is not None else 0.0))
        toks, lps, _, reason = done[best]
        result.finish_reason = reason
        txt = _Text(tok, params.stop_strings)
        for i, (t, lp) in enumerate(zip(toks, lps)):
            result.token_ids.append(t)
            result.logprobs.append(lp)
            if t in stop_ids:
                delta = txt.flush()
            else:
                delta, _ = txt.push(t)
                if i == len(toks) - 1 and reason in ("length", "time"):
                    delta += txt.flush()
            result.text = txt.text
            yield [(0, TokenEvent(t, delta, lp))]
    finally:
        if mixer is not None:
            mixer.close()
        if held is not None:
            held.release(prompt[:fed])


def continuation_logprobs(model: Transformer, context: Sequence[int], conts: Sequence[Sequence[int]],
                          mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """log P(cont | context) summed over each continuation's tokens: the context prefilled once,
    then every continuation in one batch over copies of its keys/values (right-padded: causal
    attention keeps a row's padding out of its own scores). ``mix`` (``SamplingParams.mix``)
    changes each position's distribution as it changes the decode's: the repository's memory."""
    if not context:
        raise ValueError("continuation_logprobs needs a non-empty context")
    if not conts or any(not c for c in conts):
        raise ValueError("continuation_logprobs needs non-empty continuations")
    device = model.tok_emb.weight.device
    P, L, n = len(context), max(len(c) for c in conts), len(conts)
    if P + L > model.cfg.max_seq_len:
        raise ValueError(f"context + continuation ({P + L} tokens) exceed the context length {model.cfg.max_seq_len}")
    heads: list[torch.Tensor] = []
    hook = model.norm.register_forward_hook(lambda _m, _a, out: heads.append(out)) if mix is not None else None
    try:
        with torch.inference_mode():
            rows = model.setup_cache(n, P + L, device=device)
            first = model(torch.tensor([list(context)], dtype=torch.long, device=device), 0, rows.head(1), last_only=True)
            for t in (*rows.k, *rows.v):
                t[1:, :, :P] = t[:1, :, :P]
            x = torch.tensor([list(c) + [0] * (L - len(c)) for c in conts], dtype=torch.long, device=device)
            logits = torch.cat([first[:, -1:].expand(n, 1, -1), model(x[:, :-1], P, rows)], 1) if L > 1 else \
                first[:, -1:].expand(n, 1, -1)
            if mix is not None:
                h = heads[0][:, -1:].expand(n, 1, -1)
                if L > 1:
                    h = torch.cat([h, heads[1]], 1)
                V = logits.shape[-1]
                logits = mix(logits.float().reshape(n * L, V), h.reshape(n * L, -1)).reshape(n, L, V)
            lp = logits.float().log_softmax(-1).gather(-1, x[:, :, None])[..., 0]  # [n, L]
            mask = torch.arange(L, device=device)[None] < torch.tensor([len(c) for c in conts], device=device)[:, None]
            return torch.where(mask, lp, 0.0).sum(-1).tolist()
    finally:
        if hook is not None:
            hook.remove()


def _decoded(tok, ids: list[int]) -> str:
    return tok.decode_bytes(ids).decode("utf-8", errors="replace")


class Stream:
    """Iterator of TokenEvents; ``.result`` is filled in once it is exhausted."""

    def __init__(self, model, tok, prompt_ids, params, cancel):
        self.result = GenerationResult("")
        _check(model, [list(prompt_ids)], params)  # bad requests fail here, not on the first next()
        self._steps = _decode(model, tok, [list(prompt_ids)], params, cancel, [self.result])

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> TokenEvent:
        with torch.inference_mode():
            step = next(self._steps)
        return step[0][1]


def stream(model: Transformer, tok, prompt_ids: Sequence[int], params: SamplingParams | None = None,
           cancel: CancelToken | None = None) -> Stream:
    return Stream(model, tok, prompt_ids, params or SamplingParams(), cancel)


def generate(model: Transformer, tok, prompt_ids: Sequence[int], params: SamplingParams | None = None,
             cancel: CancelToken | None = None) -> GenerationResult:
    s = stream(model, tok, prompt_ids, params, cancel)
    for _ in s:
        pass
    return s.result


def generate_batch(model: Transformer, tok, prompts: list[list[int]], params: SamplingParams | None = None,
                   cancel: CancelToken | None = None, batch_size: int = 8) -> list[GenerationResult]:
    """Generate for many prompts, ``batch_size`` rows at a time (left padded)."""
    params = params or SamplingParams()
    if params.beams > 1:  # each prompt's beams are the batch
        batch_size = 1
    out: list[GenerationResult] = []
    for a in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[a:a + batch_size]]
        results = [GenerationResult("") for _ in chunk]
        with torch.inference_mode():
            for _ in _decode(model, tok, chunk, params, cancel, results):
                pass
        out += results
    return out


@torch.inference_mode()
def token_logprobs(model: Transformer, ids: Sequence[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for every position; the first is 0.0."""
    ids = list(ids)
    if len(ids) > model.cfg.max_seq_len:
        raise ValueError(f"{len(ids)} tokens exceed the context length {model.cfg.max_seq_len}")
    if len(ids) < 2:
        return [0.0] * len(ids)
    x = torch.tensor([ids], dtype=torch.long, device=model.tok_emb.weight.device)
    logp = model(x[:, :-1]).log_softmax(-1)[0]
    return [0.0, *logp.gather(-1, x[0, 1:, None]).squeeze(-1).tolist()]


def fim_stop_ids(tok) -> tuple[int, ...]:
    """The ids that end a middle: every FIM / file marker the tokenizer has."""
    has = getattr(tok, "has_special", lambda _n: True)
    return tuple({tok.special_id(n) for n in ("fim_prefix", "fim_suffix", "fim_middle", "file_sep") if has(n)})


def fim(model: Transformer, tok, prefix: str, suffix: str, params: SamplingParams | None = None,
        cancel: CancelToken | None = None) -> GenerationResult:
    """Fill in the middle between ``prefix`` and ``suffix``; stops at eos or any FIM/file marker."""
    params = params or SamplingParams()
    p = SamplingParams(**{**params.__dict__, "stop_token_ids": tuple({*params.stop_token_ids, *fim_stop_ids(tok)})})
    return generate(model, tok, fim_prompt(tok, prefix, suffix, spm=getattr(tok, "fim_spm", True)), p, cancel)


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    err = lambda msg: print(f"moecoder generate: error: {msg}", file=sys.stderr) or 2  # noqa: E731
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, tuple(args.stop),
                            (), args.max_seconds, args.seed, loop_guard=args.loop_guard)
    try:
        params.validate()
    except ValueError as e:
        return err(e)
    if args.threads is not None:
        if args.threads < 1:
            return err("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    from model.checkpoint import CheckpointError, load_model

    try:
        loaded = load_model(args.model, dtype=args.dtype)
    except CheckpointError as e:
        return err(e)
    model, tok = loaded.model, loaded.tokenizer
    if args.fim_suffix is not None:
        if not getattr(tok, "has_fim", True):
            return err("this checkpoint has no fill-in-the-middle tokens; drop --fim-suffix")
        params.stop_token_ids = fim_stop_ids(tok)
        at_suffix = fim_suffix_stop(args.fim_suffix)  # the middle ends where the suffix begins
        if at_suffix is not None:
            params.stop_strings = (*params.stop_strings, at_suffix)
        ids = fim_prompt(tok, prompt, args.fim_suffix, spm=getattr(tok, "fim_spm", True))
        end = FimEnd(prompt, args.fim_suffix)  # where the middle ends when the model runs on
    else:
        ids = tok.encode(prompt) or [tok.eos_id]
        end = None
    out = sys.stdout
    try:
        s = stream(model, tok, ids, params)
        t0 = time.perf_counter()
        for ev in s:
            text, done = end.push(ev.text) if end is not None else (ev.text, False)
            out.write(text)
            out.flush()
            if done:
                s.result.finish_reason = "stop"
                break
        else:
            if end is not None:
                out.write(end.flush())
                out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        out.flush()
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `moecoder generate ... | head`: the reader has gone
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    except ValueError as e:
        return err(e)
    if out.isatty():
        out.write("\n")
    if sys.stderr.isatty():
        n = len(s.result.token_ids)
        dt = time.perf_counter() - t0
        print(f"[{n} tokens, {n / max(dt, 1e-9):.1f} tok/s, {s.result.finish_reason}]", file=sys.stderr)
    return 0
