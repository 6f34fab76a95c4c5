"""model.batching: iteration-level batching gives each request what it gets alone."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch

from model.batching import BatchScheduler, rows_after_remove
from model.config import get_preset
from model.generate import CancelToken, SamplingParams, generate
from model.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a short context (48) makes the batch shift right for long joiners and left when full;
    # float64 and a wide init keep greedy choices far from ties
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=512, max_seq_len=48, init_std=0.3)
    return Transformer(cfg).double().eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(20, 500) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def test_rows_after_remove_mirrors_the_cache():
    assert rows_after_remove([1, 2, 3, 4], [2]) == [1, 4, 3]
    assert rows_after_remove([1, 2, 3, 4], [4, 1]) == [3, 2]
    assert rows_after_remove([7], [7]) == []


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("stagger", [0.0, 0.01], ids=["burst", "staggered"])
def test_batched_greedy_equals_each_prompt_alone(model, tiny_tokenizer, stagger, static, monkeypatch):
    """``static``: the decode steps the GPU replays as CUDA graphs (buckets of rows over views of
    the slot arrays), run eagerly here: joins, leaves, shifts and growth must not disturb them."""
    prompts = _prompts(8)
    params = SamplingParams(max_new_tokens=20)
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "0")
    want = [generate(model, tiny_tokenizer, p, params).token_ids for p in prompts]
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "1" if static else "0")
    sched = BatchScheduler(model, tiny_tokenizer, max_batch=4)
    assert sched.state.static is static
    calls = {"decode": 0, "rows": []}  # rows: (live rows, rows of the static step that ran them)
    decode, static_step = sched.state.decode, sched.state._static_step

    def counted_decode(ids):
        calls["decode"] += 1
        return decode(ids)

    def recorded_static_step(ids):
        out = static_step(ids)
        calls["rows"].append((len(ids), sched.state._steps[min(k for k in sched.state._steps if k >= len(ids))].batch))
        return out

    sched.state.decode, sched.state._static_step = counted_decode, recorded_static_step
    sched.start()
    try:
        handles = []
        for p in prompts:
            handles.append(sched.submit(p, params))
            time.sleep(stagger)
        got = []
        for h in handles:
            streamed = [ev.token_id for ev in h]
            assert streamed == h.result.token_ids
            got.append(h.result.token_ids)
        assert got == want
        assert sched.stats["max_rows"] == 4  # never more than max_batch, and it was reached
        if static:  # every decode took a static step; 3 live rows ran in the step of 4
            assert calls["decode"] > 0 and len(calls["rows"]) == calls["decode"]
            assert (3, 4) in calls["rows"] and (4, 4) in calls["rows"]
            assert all(b == 1 << (n - 1).bit_length() for n, b in calls["rows"])
        else:
            assert calls["decode"] > 0 and calls["rows"] == []
        assert any(len(p) + len(w) >= 48 for p, w in zip(prompts, want))  # some hit the context end
    finally:
        sched.close()


def test_static_steps_survive_the_slot_arrays_growing(model, tiny_tokenizer, monkeypatch):
    """Rows 5-8 arrive while 4 decode: the slot arrays grow (4 -> 8 slots) and the static steps
    captured over the old arrays are dropped, not replayed over freed memory."""
    prompts = _prompts(8, seed=5)
    params = SamplingParams(max_new_tokens=12)
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "0")
    want = [generate(model, tiny_tokenizer, p, params).token_ids for p in prompts]
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "1")
    sched = BatchScheduler(model, tiny_tokenizer, max_batch=8, prefill_tokens=1)  # one join per step
    try:
        handles = [sched.submit(p, params) for p in prompts]
        got = [list(h) and h.result.token_ids for h in handles]
    finally:
        sched.close()
    assert got == want
    assert sched.state.capacity == 8 and sched.stats["max_rows"] > 4


def test_a_failed_capture_falls_back_to_eager_steps(model, tiny_tokenizer, monkeypatch, capsys):
    """If capturing the batch's step fails on a GPU, the requests still finish (eagerly), and it says so."""
    from model import static_decode

    init = static_decode.StaticDecoder.__init__

    def graph_decoder(self, *a, **k):
        init(self, *a, **k)
        self.use_graph = True  # as on a GPU

    def failing_capture(self, model):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(static_decode.StaticDecoder, "__init__", graph_decoder)
    monkeypatch.setattr(static_decode.StaticDecoder, "_capture", failing_capture)
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "0")
    prompts = _prompts(3, seed=9)
    params = SamplingParams(max_new_tokens=8)
    want = [generate(model, tiny_tokenizer, p, params).token_ids for p in prompts]
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "1")
    sched = BatchScheduler(model, tiny_tokenizer, max_batch=4)
    sched.start()
    try:
        got = [list(h) and h.result.token_ids for h in [sched.submit(p, params) for p in prompts]]
    finally:
        sched.close()
    assert got == want and sched.state.static is False and not sched.state._steps
    assert "decoding eagerly" in capsys.readouterr().err


def test_the_batch_never_outgrows_device_memory(model, tiny_tokenizer, monkeypatch):
    """On a GPU the rows decoded together stop where their KV cache would not fit (a failed
    allocation mid-step would stop the loop for everyone); none fitting is a clear error."""
    from model.batching import BatchState

    state = BatchState(model, capacity=4)
    row = state.row_bytes  # float64 K and V, 2 layers, 2 KV heads, 48 positions, head dim 32
    assert row == 2 * model.cfg.n_layers * model.cfg.n_kv_heads * 48 * model.cfg.head_dim * 8
    assert state.rows_that_fit() is None  # the CPU: no limit
    assert state.rows_that_fit(free_bytes=10 * row, reserve_bytes=2 * row) == 12  # the 4 held count too
    assert state.rows_that_fit(free_bytes=0, reserve_bytes=5 * row) == 0

    # memory torch's allocator holds unused (a closed scheduler's cache) counts as free
    from model.batching import device_free_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (3 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 40 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 31 << 30)
    assert device_free_bytes(torch.device("cuda")) == 12 << 30

    monkeypatch.setattr(BatchState, "rows_that_fit", lambda self: 3)
    sched = BatchScheduler(model, tiny_tokenizer, max_batch=8)
    assert sched.max_batch == 3 and "limited to 3 requests" in sched.memory_note
    monkeypatch.setattr(BatchState, "rows_that_fit", lambda self: 9)
    assert BatchScheduler(model, tiny_tokenizer, max_batch=8).max_batch == 8
    monkeypatch.setattr(BatchState, "rows_that_fit", lambda self: 0)
    with pytest.raises(ValueError, match="shorter context"):
        BatchScheduler(model, tiny_tokenizer, max_batch=8)


def test_cancel_and_time_limit_leave_the_batch_within_a_step(model, tiny_tokenizer):
    sched = BatchScheduler(model, tiny_tokenizer, max_batch=4).start()
    try:
        long = SamplingParams(max_new_tokens=40)
        keep = sched.submit([30, 31, 32], long)
        cancel = CancelToken()
        stop = sched.submit([40, 41], long, cancel)
        it = iter(stop)
        next(it)
        cancel.cancel()
        rest = list(it)
        assert stop.result.finish_reason == "cancelled" and len(rest) <= 2
        timed = sched.submit([50, 51], SamplingParams(max_new_tokens=40, max_seconds=0.0))
        list(timed)
        assert timed.result.finish_reason == "time" and len(timed.result.token_ids) <= 1
        list(keep)
        assert keep.result.token_ids == generate(model, tiny_tokenizer, [30, 31, 32], long).token_ids
        assert sched.active == 0 and sched.stats["finished"]["cancelled"] == 1
    finally:
        sched.close()


def test_bad_requests_fail_at_submit_and_a_failed_step_fails_everyone(model, tiny_tokenizer):
    sched = BatchScheduler(model, tiny_tokenizer, max_batch=2)
    with pytest.raises(ValueError, match="context length"):
        sched.submit(list(range(20, 70)), SamplingParams())
    with pytest.raises(ValueError):
        sched.submit([], SamplingParams())
    with pytest.raises(ValueError):
        sched.submit([5], SamplingParams(top_p=0))
    fatal = []
    sched.on_fatal = fatal.append
    sched.state.decode = lambda ids: (_ for _ in ()).throw(RuntimeError("device lost"))
    h = sched.submit([20, 21], SamplingParams(max_new_tokens=5))
    from model.batching import SchedulerError

    with pytest.raises(SchedulerError, match="device lost"):
        list(h)
    assert fatal and "device lost" in fatal[0]
    with pytest.raises(SchedulerError):
        sched.submit([20], SamplingParams())


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_open_checkpoints_batch_like_alone(tmp_path, family, static, monkeypatch):
    """Tiny open checkpoints (GQA + QK-norm; MLA's compressed cache) through the batch loop:
    each prompt's greedy tokens equal generating it alone (also through the static decode step)."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_tiny import load_tiny

    model, tok = load_tiny(family, tmp_path / family)
    prompts = [p[:min(len(p), 30)] or [5] for p in _prompts(6, seed=3)]
    prompts = [[t % 250 + 3 for t in p] for p in prompts]
    params = SamplingParams(max_new_tokens=12)
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "0")
    want = [generate(model, tok, p, params).token_ids for p in prompts]
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "1" if static else "0")
    sched = BatchScheduler(model, tok, max_batch=4).start()
    try:
        handles = [sched.submit(p, params) for p in prompts]
        got = [list(h) and h.result.token_ids for h in handles]
    finally:
        sched.close()
    assert got == want
    assert bool(sched.state._steps) is static


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_cuda_graph_batch_matches_eager(model, tiny_tokenizer, monkeypatch):
    """On a GPU the batch's decode steps replay captured graphs: same greedy tokens as eager."""
    import copy

    gpu = copy.deepcopy(model).float().cuda()
    prompts = _prompts(6, seed=7)
    params = SamplingParams(max_new_tokens=16)
    got = {}
    for mode in ("0", "auto"):
        monkeypatch.setenv("MOECODER_CUDA_GRAPH", mode)
        sched = BatchScheduler(gpu, tiny_tokenizer, max_batch=4).start()
        try:
            handles = [sched.submit(p, params) for p in prompts]
            got[mode] = [list(h) and h.result.token_ids for h in handles]
        finally:
            sched.close()
        assert sched.state.static is (mode == "auto")
    assert got["auto"] == got["0"]
    assert sched.state._steps and all(d.graph is not None for d in sched.state._steps.values())
