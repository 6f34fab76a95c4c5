"""The CPU fast path of the routed experts (kernels/cpu.py) against the reference, in float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from kernels import cpu
from kernels import reference as ref


def _case(T, E, K, D=16, F=12, one=None, empty=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    if one is not None:
        logits[:, one] += 100.0
    for e in empty:
        logits[:, e] -= 100.0
    w, ex = ref.route(logits, K)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    wg = torch.randn(E, D, F, generator=g, dtype=torch.float64) * D**-0.5
    wu = torch.randn(E, D, F, generator=g, dtype=torch.float64) * D**-0.5
    wd = torch.randn(E, F, D, generator=g, dtype=torch.float64) * F**-0.5
    return x, w.double(), ex, wg, wu, wd


@pytest.mark.parametrize(
    "T,E,K,one,empty",
    [
        (1, 8, 2, None, ()),  # a decode step
        (1, 8, 1, None, ()),
        (1, 4, 4, None, ()),  # every expert chosen by the one token
        (2, 8, 2, None, ()),
        (8, 8, 2, 3, ()),  # every token to expert 3
        (37, 8, 2, None, (0, 2, 7)),  # experts with no tokens
        (23, 4, 1, None, ()),
        (11, 16, 8, None, ()),
    ],
)
def test_matches_reference_forward_and_backward(T, E, K, one, empty):
    args = _case(T, E, K, one=one, empty=empty)
    a = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    b = [t.clone().requires_grad_(t.is_floating_point()) for t in args]
    out = cpu.moe_experts(*a)
    outr = ref.moe_experts(*b)
    assert out.shape == (T, args[0].shape[1]) and out.dtype == torch.float64
    torch.testing.assert_close(out, outr, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    leaves_a = [t for t in a if t.requires_grad]
    leaves_b = [t for t in b if t.requires_grad]
    grads = torch.autograd.grad(out, leaves_a, go)
    grads_r = torch.autograd.grad(outr, leaves_b, go)
    for name, ga, gb in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads_r):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12, msg=name)
    for e in empty:  # an expert no token chose gets exactly zero gradient
        assert torch.count_nonzero(grads[2][e]) == 0 and torch.count_nonzero(grads[4][e]) == 0


@pytest.mark.parametrize("T", [1, 7])
def test_float32_under_inference_mode_matches_to_rounding(T):
    """The decode-time setting: float32 under inference_mode, equal to the reference up to rounding."""
    x, w, ex, wg, wu, wd = (t.float() if t.is_floating_point() else t for t in _case(T, 8, 2, D=64, F=48))
    with torch.inference_mode():
        out, outr = cpu.moe_experts(x, w, ex, wg, wu, wd), ref.moe_experts(x, w, ex, wg, wu, wd)
    torch.testing.assert_close(out, outr, rtol=1e-5, atol=1e-6)


def test_float32_weights_with_float64_activations_are_cast():
    """Routing weights stay float32 while activations are another dtype, as in the model."""
    x, w, ex, wg, wu, wd = _case(5, 4, 2)
    out = cpu.moe_experts(x, w.float(), ex, wg, wu, wd)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref.moe_experts_loop(x, w, ex, wg, wu, wd), rtol=1e-6, atol=1e-6)


def test_dispatcher_uses_fast_path_on_cpu_unless_reference_forced(monkeypatch):
    calls = []
    real = cpu.moe_experts
    monkeypatch.setattr(cpu, "moe_experts", lambda *a: calls.append(1) or real(*a))
    args = _case(3, 4, 2)
    monkeypatch.setenv("MOECODER_KERNELS", "auto")
    fast = kernels.moe_experts(*args)
    assert calls == [1]
    monkeypatch.setenv("MOECODER_KERNELS", "reference")
    slow = kernels.moe_experts(*args)
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


def test_tiny_model_generates_the_same_tokens_on_either_path(monkeypatch, tiny_tokenizer):
    """Greedy generation and logprobs through the KV cache agree between the fast path and the reference."""
    from model.config import get_preset
    from model.generate import SamplingParams, generate
    from model.transformer import Transformer

    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=tiny_tokenizer.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = tiny_tokenizer.encode("def add(a, b):\n    return")
    params = SamplingParams(max_new_tokens=12)
    runs = {}
    for mode in ("auto", "reference"):
        monkeypatch.setenv("MOECODER_KERNELS", mode)
        runs[mode] = generate(model, tiny_tokenizer, prompt, params)
    assert runs["auto"].token_ids == runs["reference"].token_ids
    assert runs["auto"].logprobs == pytest.approx(runs["reference"].logprobs, abs=1e-4)
