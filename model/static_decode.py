"""Decode steps replayed from a CUDA graph, for the product's generation loop (gpt-fast style).

An eager decode step of a large MoE is hundreds of small kernels, each launched from Python:
on a GPU the step is bound by the host, not by the weights it reads (Qwen3-30B-A3B on an
H100: ~16 tokens/s eager, ~260 from a graph; docs/benchmarks.md). ``StaticDecoder`` keeps a
preallocated KV cache whose length is a power of two (>= 1024 positions), static token/position
inputs, and one captured ``Transformer.decode_static`` step per (batch, cache length, padded or
not). A later generation reuses any free decoder of its batch whose cache is long enough (the
fused attention reads the cache only up to the current position, so a longer cache costs memory,
not time): completions of varying prompt lengths share one graph instead of capturing again.

The prompt's first prefill chunk is a graph too (``prefill``): on a GPU a 2k-token prefill of a
large MoE is also bound by the host's launches (~45 per layer; docs/benchmarks.md). The chunk is
right-padded to a bucket (``PREFILL_BUCKETS``: 256-token steps to 1024, then steps of at most a
quarter up to 8192) and one graph per bucket is captured, its head computed at the last real
token (a device index). The padding cannot change the real tokens' logits (attention is causal,
routing is per token and dropless); its keys and values land in cache slots after the prompt,
which decoding overwrites before it reads them. Later chunks of a long prompt, and prompts whose
bucket exceeds the cache, run eagerly.

``MOECODER_CUDA_GRAPH=auto|1|0``: auto uses it on CUDA; 1 takes the static step everywhere
(eagerly where there is no CUDA: the tests check the plumbing on the CPU that way); 0 keeps
the plain eager step.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict

import torch

MIN_LEN = 1024  # cache lengths: powers of two from here (capped at the model's context)
KEEP = 2  # decoders (graph + cache) kept per model, least recently used dropped first
# first-chunk lengths: 256-token steps to 1024, then at most a quarter of padding, up to 8192
PREFILL_BUCKETS = (256, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192)
KEEP_PREFILL = 3  # prefill graphs kept per decoder (they share one memory pool)


def cache_len(total: int, ctx: int) -> int:
    """The static cache length for ``total`` positions: a power of two >= MIN_LEN, at most ``ctx``."""
    n = MIN_LEN
    while n < total:
        n *= 2
    return min(n, ctx)


def prefill_bucket(n: int, limit: int) -> int | None:
    """The padded length of an ``n``-token first chunk (None: no bucket fits ``limit`` positions)."""
    b = next((b for b in PREFILL_BUCKETS if b >= n), None)
    return b if b is not None and b <= limit else None


def mode() -> str:
    m = os.environ.get("MOECODER_CUDA_GRAPH", "auto").strip().lower() or "auto"
    if m not in ("auto", "1", "0"):
        raise ValueError(f"MOECODER_CUDA_GRAPH must be one of auto, 1, 0; got {m!r}")
    return m


def wanted(device: torch.device) -> bool:
    m = mode()
    return m == "1" or (m == "auto" and device.type == "cuda")


class StaticDecoder:
    """A static cache + the inputs of one decode step, and (on CUDA) the step as a graph."""

    def __init__(self, model, batch: int, max_len: int, padded: bool, device: torch.device,
                 graph: bool | None = None, cache=None):
        self.batch, self.max_len, self.device = batch, max_len, device  # no reference to the model: no cycle
        self.use_graph = device.type == "cuda" if graph is None else graph  # False: decode_static eagerly
        # ``cache``: an existing KVCache of ``batch`` rows (the batching loop's slot arrays); else a new one
        self.cache = model.setup_cache(batch, max_len, device=device) if cache is None else cache
        self.pad = torch.zeros(batch, dtype=torch.long, device=device) if padded else None
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        # prefill graphs by bucket: (graph or None, static tokens [B, bucket], last index [1], logits)
        self.prefills: OrderedDict[int, tuple] = OrderedDict()
        self._prefill_pool = None
        self.busy = False
        self._pads: list[int] | None = None

    def begin(self, pad_lens: list[int]) -> None:
        """Start a generation: this decoder's cache now belongs to it (stale slots are masked)."""
        if self.pad is not None:
            self.pad.copy_(torch.as_tensor(pad_lens, dtype=torch.long))
            self._pads = list(pad_lens)
        self.cache.pad_lens = self.pad
        self.busy = True

    def set_pads(self, pad_lens: list[int]) -> None:
        """New left padding for the next steps (copied to the device only when it changed)."""
        if pad_lens != self._pads:
            self.pad.copy_(torch.as_tensor(pad_lens, dtype=torch.long))
            self._pads = list(pad_lens)

    def end(self) -> None:
        self.busy = False

    def step(self, model, ids_B: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits [B, V] of the tokens ``ids_B`` at position ``pos`` (valid until the next step)."""
        self.tok.copy_(ids_B.reshape(self.batch, 1))
        self.pos.fill_(pos)
        if not self.use_graph:
            return model.decode_static(self.tok, self.pos, self.cache)[:, -1]
        if self.graph is None:
            self._capture(model)
        self.graph.replay()
        return self.logits[:, -1]

    def prefill(self, model, ids_BT: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [B, 1, V] of the last of ``ids_BT`` written at ``start`` (valid until the next
        prefill of this bucket): the first chunk from a bucket's graph, others eagerly."""
        T = ids_BT.shape[1]
        bucket = prefill_bucket(T, self.cache.max_len) if start == 0 and self.batch == ids_BT.shape[0] else None
        if bucket is None:
            return model(ids_BT, start, self.cache, last_only=True)
        entry = self.prefills.get(bucket)
        if entry is None:
            entry = self._capture_prefill(model, bucket)
        self.prefills.move_to_end(bucket)
        graph, tok, last, logits = entry
        if graph is None and self.use_graph:  # its capture failed (reported once): eagerly, unpadded
            return model(ids_BT, start, self.cache, last_only=True)
        tok[:, :T].copy_(ids_BT)  # the padding after T keeps whatever ids it had: valid ones, never read
        last.fill_(T - 1)
        if graph is None:  # no CUDA: the same padded forward, eagerly (the tests check the plumbing)
            return model(tok, 0, self.cache, last_index=last)
        graph.replay()
        return logits

    def _capture_prefill(self, model, bucket: int) -> tuple:
        tok = torch.zeros(self.batch, bucket, dtype=torch.long, device=self.device)
        last = torch.zeros(1, dtype=torch.long, device=self.device)
        while len(self.prefills) >= KEEP_PREFILL:
            self.prefills.popitem(last=False)
        if not self.use_graph:
            entry = (None, tok, last, None)
        else:
            try:
                graph, logits = self._record_prefill(model, tok, last)
                entry = (graph, tok, last, logits)
            except RuntimeError as e:  # e.g. an op that cannot be captured: this bucket runs eagerly
                print(f"moecoder: prefill CUDA graph ({bucket} tokens) not captured, eager instead: "
                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
                entry = (None, tok, last, None)
        self.prefills[bucket] = entry
        return entry

    def _record_prefill(self, model, tok: torch.Tensor, last: torch.Tensor):
        """Warm up and capture one padded prefill: (graph, its logits)."""
        model.prepare_static()  # no weight may move after a capture
        side = torch.cuda.Stream(self.device)  # warm-up: Triton compiles and tunes for this length
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model(tok, 0, self.cache, last_index=last)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._prefill_pool):
            logits = model(tok, 0, self.cache, last_index=last)
        return graph, logits

    def _capture(self, model) -> None:
        model.prepare_static()
        # Warm-up outside the graph (Triton compiles, cuBLAS picks its kernels). Each call writes
        # this step's key/value into slot ``pos``; the captured step writes the same values again.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode_static(self.tok, self.pos, self.cache)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = model.decode_static(self.tok, self.pos, self.cache)
        self.graph = graph


def acquire(model, batch: int, total: int, padded: bool) -> StaticDecoder | None:
    """A free decoder for ``batch`` rows and ``total`` positions (None: not wanted here, or the
    shape's decoder is in use by another generation still running, which then decodes eagerly)."""
    w = model.tok_emb.weight
    if not wanted(w.device):
        return None
    pool: OrderedDict = model.__dict__.setdefault("_static_decoders", OrderedDict())
    where = (str(w.device), w.dtype, w.data_ptr())  # moved, cast or copied since: the old decoders are stale
    for k in [k for k, d in pool.items() if k[:3] != where and not d.busy]:
        del pool[k]
    fits = [k for k in pool if k[:3] == where and k[3] == batch and k[5] == padded and k[4] >= total]
    free = [k for k in fits if not pool[k].busy]
    if fits and not free:
        return None
    key = min(free, key=lambda k: k[4]) if free else (*where, batch, cache_len(total, model.cfg.max_seq_len), padded)
    dec = pool.get(key)
    if dec is None:
        max_len = key[4]
        for k in [k for k, d in pool.items() if not d.busy][: max(0, len(pool) + 1 - KEEP)]:
            del pool[k]  # least recently used first; their graphs and caches are freed
        dec = StaticDecoder(model, batch, max_len, padded, w.device)
        pool[key] = dec
    pool.move_to_end(key)
    return dec
