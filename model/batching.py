"""Iteration-level batching: many generations share one KV cache and one forward per step.

A request joins the running batch at any decode step and leaves it the step after it
finishes (or is cancelled), so a short request never waits for a long one.

Layout. Rows of the cache are the active requests, packed at the front of a slot array
(a leaving row is replaced by the last one). Every row writes its next token at the same
column ``pos``; a row's tokens sit right-aligned before it, after ``pad`` hidden columns
(the left padding of ``model.generate``): positions count from a row's first real token,
so a row computes exactly what it would alone. A joining prompt of P tokens is prefilled
into columns ``[pos - P, pos)`` (the whole batch shifts right first when ``pos < P``); when
``pos`` reaches the end of the cache the batch shifts left by the smallest padding.

:class:`BatchState` executes *plans* (remove rows, decode one token per row, admit
prompts, score sequences) and is deterministic, so that under expert parallelism every
rank executes the same plans (rank 0 broadcasts them) and holds the same cache.

Decode steps on a GPU replay CUDA graphs (``MOECODER_CUDA_GRAPH``, :mod:`model.static_decode`):
one captured ``decode_static`` step per bucket of rows (powers of two up to the capacity) over
views of the slot arrays; rows past the live ones in a bucket decode a dummy token into unused
slots and are ignored. Growing the slot arrays drops the graphs. Not under expert parallelism
(its all-to-all needs sizes on the host).
:class:`BatchScheduler` is rank 0's loop: it turns requests into plans, samples, streams
:class:`~model.generate.TokenEvent` to each request and enforces its limits.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model import static_decode
from model.generate import (
    CancelToken,
    GenerationResult,
    SamplingParams,
    TokenEvent,
    _Text,
    prefill_chunk,
    sample,
    sampling_probs,
    token_logprobs,
)
from model.layers import KVCache


# --------------------------------------------------------------------------- the cache and its plans
def rows_after_remove(rows: Sequence[int], rids: Sequence[int]) -> list[int]:
    """The row order after :meth:`BatchState.remove` (each leaving row is replaced by the last)."""
    rows = list(rows)
    for rid in rids:
        i = rows.index(rid)
        rows[i] = rows[-1]
        rows.pop()
    return rows


class _RowsView(KVCache):
    """A KVCache over rows ``[a, b)`` of the slot arrays (views: writes land in the slots)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], pads: torch.Tensor | None):
        self.k, self.v = k, v
        self.batch, self.max_len = k[0].shape[0], k[0].shape[2]
        self.pad_lens = pads if pads is not None and bool((pads > 0).any()) else None


@dataclass
class Plan:
    """One step, executed identically on every rank."""

    remove: list[int] = field(default_factory=list)  # request ids leaving the batch
    decode: list[int] | None = None  # one token per remaining row (row order), or None
    join: list[tuple[int, list[int]]] = field(default_factory=list)  # (request id, prompt ids)
    score: list[list[int]] = field(default_factory=list)  # sequences for token_logprobs
    stop: bool = False

    def empty(self) -> bool:
        return not (self.remove or self.decode or self.join or self.score or self.stop)


RESERVE_BYTES = 4 << 30  # GPU memory kept free of batch cache rows: activations of a prefill chunk, graphs


class BatchState:
    """The shared KV cache of the running batch; see the module docstring."""

    def __init__(self, model: Any, capacity: int = 4, max_len: int | None = None, static: bool | None = None):
        self.model = model
        cfg = model.cfg
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        p = model.tok_emb.weight
        self.device, self.dtype = p.device, p.dtype
        self.rows: list[int] = []  # request id of each row
        self.pads: list[int] = []
        self.pos = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        if static is None:  # the static (graph-replayed) decode step: not across ranks
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            static = static_decode.wanted(self.device) and not (dist and torch.distributed.get_world_size() > 1)
        self.static = static
        self._steps: dict[int, static_decode.StaticDecoder] = {}  # rows bucket -> its decode step
        self._alloc(capacity)

    # ----------------------------------------------------------------- storage
    def _alloc(self, capacity: int) -> None:
        # the model's own cache layout (grouped K/V heads, or MLA's compressed latent)
        fresh = self.model.setup_cache(capacity, self.max_len, device=self.device, dtype=self.dtype)
        n = len(self.rows)
        for old, new in zip(self.k + self.v, fresh.k + fresh.v):
            new[:n] = old[:n]
        self.k, self.v, self.capacity = fresh.k, fresh.v, capacity
        self._steps.clear()  # their graphs point at the old slot arrays

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def row_bytes(self) -> int:
        """KV-cache bytes of one request's row (all layers, ``max_len`` positions)."""
        return sum(t[0].numel() * t.element_size() for t in self.k + self.v)

    def rows_that_fit(self, free_bytes: int | None = None, reserve_bytes: int = RESERVE_BYTES) -> int | None:
        """How many rows the device's memory holds (the rows allocated now included), keeping
        ``reserve_bytes`` for activations and graphs; None on the CPU (no limit applied)."""
        if free_bytes is None:
            if self.device.type != "cuda":
                return None
            free_bytes = device_free_bytes(self.device)
        return max(0, (free_bytes + self.capacity * self.row_bytes - reserve_bytes) // self.row_bytes)

    def _view(self, a: int, b: int) -> _RowsView:
        pads = torch.tensor(self.pads[a:b], dtype=torch.long, device=self.device)
        return _RowsView([t[a:b] for t in self.k], [t[a:b] for t in self.v], pads)

    def _shift(self, d: int) -> None:
        """Move every row's columns by ``d`` (right if > 0); pads follow."""
        n, p = self.n, self.pos
        if d == 0 or n == 0:
            self.pos = max(p + d, 0)
            return
        for t in self.k + self.v:
            if d > 0:
                t[:n, :, d:p + d] = t[:n, :, :p].clone()
            else:
                t[:n, :, :p + d] = t[:n, :, -d:p].clone()
        self.pads = [x + d for x in self.pads]
        self.pos = p + d

    # ----------------------------------------------------------------- plan steps
    def remove(self, rids: Sequence[int]) -> None:
        for rid in rids:
            i = self.rows.index(rid)
            last = self.n - 1
            if i != last:  # the last row moves into the hole (see rows_after_remove)
                for t in self.k + self.v:
                    t[i] = t[last]
                self.rows[i], self.pads[i] = self.rows[last], self.pads[last]
            self.rows.pop()
            self.pads.pop()
        if not self.rows:
            self.pos = 0

    def decode(self, ids: Sequence[int]) -> torch.Tensor:
        """Feed one token per row at column ``pos``; logits [n, V]."""
        if len(ids) != self.n:
            raise RuntimeError(f"decode plan has {len(ids)} tokens for {self.n} rows")
        if self.pos >= self.max_len:  # full: drop the columns every row has as padding
            self._shift(-min(self.pads))
            if self.pos >= self.max_len:
                raise RuntimeError("batch cache is full (a row outlived its length limit)")
        logits = self._static_step(ids) if self.static else None
        if logits is None:
            x = torch.tensor(ids, dtype=torch.long, device=self.device)[:, None]
            logits = self.model(x, self.pos, self._view(0, self.n))[:, -1]
        self.pos += 1
        return logits

    def _static_step(self, ids: Sequence[int]) -> torch.Tensor | None:
        """The decode step through a static decoder over the first ``b`` slots (``b`` = the
        rows rounded up to a power of two, at most the capacity); logits of the live rows
        (a view, valid until the next step); None if capturing the step failed (then eager)."""
        n = self.n
        b = min(1 << (n - 1).bit_length(), self.capacity)
        dec = self._steps.get(b)
        if dec is None:
            view = _RowsView([t[:b] for t in self.k], [t[:b] for t in self.v], None)
            dec = static_decode.StaticDecoder(self.model, b, self.max_len, True, self.device, cache=view)
            dec.begin([0] * b)
            self._steps[b] = dec
        fill = [0] * (b - n)  # the rows past the live ones: pad 0, a dummy token, ignored
        dec.set_pads(self.pads + fill)
        tok = torch.as_tensor(list(ids) + fill, dtype=torch.long)
        if dec.use_graph and dec.graph is None:  # this step captures: if that fails, decode eagerly from now on
            try:
                return dec.step(self.model, tok, self.pos)[:n]
            except RuntimeError as e:
                self.static = False
                self._steps.clear()
                line = str(e).strip().splitlines()
                print(f"moecoder: capturing the batch's decode step in a CUDA graph failed, decoding eagerly "
                      f"({type(e).__name__}: {line[0] if line else ''})", file=sys.stderr, flush=True)
                return None
        return dec.step(self.model, tok, self.pos)[:n]

    def join(self, joins: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """Prefill new rows so that every prompt ends at column ``pos``; logits [len(joins), V].

        Each prompt is prefilled on its own: prefill is compute-bound, and a left-padded
        batch of prompts of different lengths computes the padding too (2.5x the work for
        the load test's prompts, measured).
        """
        lens = [len(p) for _, p in joins]
        if not all(0 < P < self.max_len for P in lens):
            raise RuntimeError(f"a prompt of {max(lens)} tokens does not fit the cache of {self.max_len}")
        if self.pos < max(lens):
            self._shift(max(lens) - self.pos)
        need = self.n + len(joins)
        if need > self.capacity:
            cap = self.capacity
            while cap < need:
                cap *= 2
            self._alloc(cap)
        out = []
        for rid, prompt in joins:
            i, P = self.n, len(prompt)
            self.rows.append(rid)
            self.pads.append(self.pos - P)
            view = self._view(i, i + 1)
            x = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
            chunk = prefill_chunk(self.device)
            for c in range(0, P, chunk):
                logits = self.model(x[:, c:c + chunk], self.pos - P + c, view, last_only=True)
            out.append(logits[:, -1])
        return torch.cat(out)

    def execute(self, plan: Plan) -> tuple[torch.Tensor | None, list[list[float]]]:
        """Run a plan: (last logits of every row after it, in row order, or None; scores)."""
        with torch.inference_mode():
            self.remove(plan.remove)
            parts = []
            if plan.decode is not None and self.n:
                parts.append(self.decode(plan.decode))
            if plan.join:
                parts.append(self.join(plan.join))
            scores = [token_logprobs(self.model, ids) for ids in plan.score]
            return (torch.cat(parts) if parts else None), scores


# --------------------------------------------------------------------------- requests
class SchedulerError(RuntimeError):
    """The batch loop has stopped (a failed step, a lost rank): a one-line message."""


_DONE = object()


class Handle:
    """One request in the scheduler: an iterator of TokenEvents (``.result`` at the end).

    ``sink`` (optional) receives every TokenEvent and finally ``None`` from the
    scheduler thread instead of the internal queue (for asyncio bridges). Leaving the
    iteration early cancels the request.
    """

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, cancel: CancelToken | None,
                 tok: Any, sink: Callable[[TokenEvent | None], None] | None = None, device: Any = "cpu"):
        self.rid, self.prompt, self.params = rid, prompt, params
        self.cancel = cancel or CancelToken()
        self.sink = sink
        self.result = GenerationResult("")
        self.error: str | None = None
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self._q: queue.Queue = queue.Queue()
        self._text = _Text(tok, params.stop_strings)
        self._gen = (torch.Generator(device=device).manual_seed(params.seed)
                     if params.seed is not None else None)
        self._wm = None
        if params.watermark is not None:  # model/watermark.py
            from model.watermark import WatermarkState

            self._wm = WatermarkState(params.watermark, [prompt])
        self.finished = threading.Event()

    # called on the scheduler thread
    def _emit(self, item: TokenEvent | None) -> None:
        if self.sink is not None:
            self.sink(item)
        else:
            self._q.put(_DONE if item is None else item)

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.result.finish_reason = reason
        self.error = error
        self.finished.set()
        self._emit(None)

    # consumer side
    def __iter__(self) -> Handle:
        return self

    def __next__(self) -> TokenEvent:
        while True:
            try:
                item = self._q.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        if item is _DONE:
            self._q.put(_DONE)  # stay exhausted
            if self.error:
                raise SchedulerError(self.error)
            raise StopIteration
        return item

    def close(self) -> None:
        if not self.finished.is_set():
            self.cancel.cancel()

    def __del__(self) -> None:  # an abandoned stream stops generating
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


@dataclass
class _Score:
    ids: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    value: list[float] | None = None
    error: str | None = None


def device_free_bytes(device: torch.device) -> int:
    """Bytes a new allocation on this GPU can take: the driver's free memory plus what torch's
    caching allocator holds unused (freed tensors, a previous scheduler's cache: the driver
    counts those as taken, torch hands them out again)."""
    free = torch.cuda.mem_get_info(device)[0]
    return free + max(0, torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


class BatchScheduler:
    """Rank 0's batching loop on one thread. ``submit`` and ``score`` are thread-safe.

    ``broadcast(plan)`` (optional) sends each plan to the follower ranks before it runs;
    it is also called with an empty plan every ``heartbeat_s`` while idle, so that
    followers waiting in a collective with a timeout know rank 0 is alive.
    """

    def __init__(self, model: Any, tok: Any, max_batch: int = 32, *,
                 broadcast: Callable[[Plan], None] | None = None, heartbeat_s: float = 5.0,
                 on_fatal: Callable[[str], None] | None = None, max_len: int | None = None,
                 prefill_tokens: int = 2048):
        self.model, self.tok = model, tok
        self.max_batch = max(1, max_batch)
        self.broadcast, self.heartbeat_s, self.on_fatal = broadcast, heartbeat_s, on_fatal
        # prompt tokens admitted per step (at least one prompt): running rows keep decoding
        # while a crowd of new requests is prefilled over several steps
        self.prefill_tokens = prefill_tokens
        self.state = BatchState(model, capacity=min(4, self.max_batch), max_len=max_len)
        # the batch's KV cache grows with the rows in use: never past what the device holds
        # (a failed allocation mid-step would stop the loop for every request)
        self.memory_note = ""
        fit = self.state.rows_that_fit()
        if fit is not None and fit < self.max_batch:
            if fit < 1:
                raise ValueError(f"no room on {self.state.device} for one request's KV cache "
                                 f"({self.state.row_bytes / 2**30:.1f} GiB at {self.state.max_len} positions): "
                                 "use a shorter context (moecoder serve --context)")
            self.memory_note = (f"batch limited to {fit} requests by device memory "
                                f"({self.state.row_bytes / 2**30:.2f} GiB of KV cache each at {self.state.max_len} positions)")
            self.max_batch = fit
        self.ctx = min(model.cfg.max_seq_len, self.state.max_len)  # a request's prompt + new tokens
        self.vocab = min(int(tok.vocab_size), model.cfg.vocab_size)
        self.pad_id = getattr(tok, "pad_id", -1)
        self._ids = itertools.count(1)
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._waiting: list[Handle] = []
        self._active: dict[int, Handle] = {}
        self._next: dict[int, int] = {}  # request id -> token to feed at the next decode
        self._thread: threading.Thread | None = None
        self._closing = False
        self.fatal: str | None = None
        self.stats = {"steps": 0, "finished": {}, "tokens": 0, "max_rows": 0}

    # ----------------------------------------------------------------- public
    def start(self) -> BatchScheduler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="moecoder-batch", daemon=True)
            self._thread.start()
        return self

    def validate(self, prompt: Sequence[int], params: SamplingParams) -> None:
        params.validate()
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if len(prompt) >= self.ctx:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context length {self.ctx}")

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None, cancel: CancelToken | None = None,
               sink: Callable[[TokenEvent | None], None] | None = None) -> Handle:
        params = params or SamplingParams()
        self.validate(prompt, params)
        if self.fatal:
            raise SchedulerError(self.fatal)
        if self._closing:
            raise SchedulerError("the server is shutting down")
        h = Handle(next(self._ids), list(prompt), params, cancel, self.tok, sink, self.state.device)
        with self._lock:
            self._waiting.append(h)
        self._wake.set()
        self.start()
        return h

    def score(self, ids: Sequence[int], timeout: float | None = None) -> list[float]:
        """``token_logprobs`` through the loop (every rank runs the same forward)."""
        if self.fatal:
            raise SchedulerError(self.fatal)
        job = _Score(list(ids))
        self._inbox.put(job)
        self._wake.set()
        self.start()
        if not job.done.wait(timeout):
            raise SchedulerError("scoring timed out")
        if job.error:
            raise SchedulerError(job.error)
        return job.value or []

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float = 30.0) -> None:
        """Finish: cancel what runs, tell followers to stop, join the loop."""
        self._closing = True
        with self._lock:
            for h in self._waiting + list(self._active.values()):
                h.cancel.cancel()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        elif self._thread is None and self.broadcast is not None and not self.fatal:
            self.broadcast(Plan(stop=True))

    # ----------------------------------------------------------------- the loop
    def _loop(self) -> None:
        last_sent = time.monotonic()
        try:
            while True:
                plan, scores = self._plan()
                if plan.stop:
                    if self.broadcast is not None:
                        self.broadcast(plan)
                    return
                if plan.empty():
                    if self.broadcast is not None and time.monotonic() - last_sent >= self.heartbeat_s:
                        self.broadcast(plan)
                        last_sent = time.monotonic()
                    self._wake.wait(min(self.heartbeat_s, 0.5) if self.broadcast is not None else 0.5)
                    self._wake.clear()
                    continue
                if self.broadcast is not None:
                    self.broadcast(plan)
                    last_sent = time.monotonic()
                logits, values = self.state.execute(plan)
                self.stats["steps"] += 1
                self.stats["max_rows"] = max(self.stats["max_rows"], self.state.n)
                for job, v in zip(scores, values):
                    job.value = v
                    job.done.set()
                if logits is not None:
                    self._sample(logits)
        except BaseException as e:  # noqa: BLE001 - a failed step ends the loop, never silently
            msg = str(e).strip().splitlines()
            self.fatal = f"batch loop stopped: {type(e).__name__}: {msg[0] if msg else ''}"
            self._fail_all(self.fatal)
            if self.on_fatal is not None:
                self.on_fatal(self.fatal)

    def _fail_all(self, msg: str) -> None:
        with self._lock:
            handles = self._waiting + list(self._active.values())
            self._waiting, self._active = [], {}
        for h in handles:
            h._finish("error", msg)
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                break
            job.error = msg
            job.done.set()

    def _plan(self) -> tuple[Plan, list[_Score]]:
        plan = Plan()
        now = time.monotonic()
        # leaving: finished last step (already removed from _active), cancelled, out of time
        for rid in list(self.state.rows):
            h = self._active.get(rid)
            if h is None:
                plan.remove.append(rid)
            elif h.cancel.cancelled or self._closing:
                plan.remove.append(rid)
                del self._active[rid]
                self._done(h, "cancelled")
            elif h.params.max_seconds is not None and now - h.submitted >= h.params.max_seconds:
                plan.remove.append(rid)
                del self._active[rid]
                h.result.text += h._text.flush()
                self._done(h, "time")
        for rid in plan.remove:
            self._next.pop(rid, None)
        remaining = rows_after_remove(self.state.rows, plan.remove)
        if remaining:
            plan.decode = [self._next[r] for r in remaining]
        # joining
        with self._lock:
            waiting, self._waiting = self._waiting, []
        room = self.max_batch - len(remaining)
        budget = self.prefill_tokens
        for h in waiting:
            if h.cancel.cancelled or self._closing:
                self._done(h, "cancelled")
            elif room > 0 and (budget > 0 or not plan.join):
                plan.join.append((h.rid, h.prompt))
                self._active[h.rid] = h
                room -= 1
                budget -= len(h.prompt)
            else:
                with self._lock:
                    self._waiting.append(h)
        scores: list[_Score] = []
        while True:
            try:
                scores.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        plan.score = [s.ids for s in scores]
        if self._closing and not self._active and not self._waiting and not plan.remove:
            plan.stop = True
        return plan, scores

    def _done(self, h: Handle, reason: str) -> None:
        self.stats["finished"][reason] = self.stats["finished"].get(reason, 0) + 1
        h._finish(reason)

    def _sample(self, logits_NV: torch.Tensor) -> None:
        rows = self.state.rows
        allowed = logits_NV[:, :self.vocab].float()
        if 0 <= self.pad_id < self.vocab:
            allowed = allowed.clone()
            allowed[:, self.pad_id] = float("-inf")
        greedy = [i for i, r in enumerate(rows)
                  if self._active[r].params.temperature <= 0 and self._active[r]._wm is None]
        ids = [0] * len(rows)
        if greedy:
            for i, t in zip(greedy, allowed[greedy].argmax(-1).tolist()):
                ids[i] = t
        for i, r in enumerate(rows):
            h = self._active[r]
            if h._wm is not None:
                ids[i] = int(h._wm.sample(allowed[i:i + 1], h.params, h._gen, sampling_probs)[0])
                h._wm.push([ids[i]])
            elif h.params.temperature > 0:
                ids[i] = int(sample(allowed[i:i + 1], h.params, h._gen)[0])
        lps = logits_NV.float().log_softmax(-1).gather(-1, torch.tensor(ids, device=logits_NV.device)[:, None])
        lps_l = lps.squeeze(-1).tolist()
        now = time.monotonic()
        eos = int(self.tok.eos_id)
        for i, r in enumerate(rows):
            h = self._active[r]
            t, lp, res, p = ids[i], lps_l[i], h.result, h.params
            if h.first_token_at is None:
                h.first_token_at = now
            res.token_ids.append(t)
            res.logprobs.append(lp)
            self.stats["tokens"] += 1
            limit = min(p.max_new_tokens, self.ctx - len(h.prompt))
            if t == eos or t in p.stop_token_ids:
                delta, reason = h._text.flush(), "eos" if t == eos else "stop"
            else:
                delta, hit = h._text.push(t)
                reason = "stop" if hit else None
                if reason is None and len(res.token_ids) >= limit:
                    reason = "length"
                if reason is None and p.max_seconds is not None and now - h.submitted >= p.max_seconds:
                    reason = "time"
                if reason in ("length", "time"):
                    delta += h._text.flush()
            res.text = h._text.text
            h._emit(TokenEvent(t, delta, lp))
            if reason is not None:
                del self._active[r]
                self._done(h, reason)
            else:
                self._next[r] = t


def follow(state: BatchState, receive: Callable[[], Plan]) -> None:
    """A follower rank's loop: execute rank 0's plans until a stop plan."""
    while True:
        plan = receive()
        if plan.stop:
            return
        if not plan.empty():
            state.execute(plan)
