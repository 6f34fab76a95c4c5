"""The fused static decode step (Transformer.decode_static with MOECODER_FUSED_DECODE) gives the
logits of the plain static step and of the ordinary cached forward, for a GQA + QK-norm family
(Qwen3-MoE) and an MLA family (DeepSeek-V2), with and without left padding; the fused kernels
run under the Triton interpreter (MOECODER_KERNELS=triton) and as the references."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from model.hf.families import family_from_config  # noqa: E402
from model.hf_bench import CONFIGS, TINY  # noqa: E402
from model.transformer import Transformer  # noqa: E402


def _model(name: str, seed: int) -> Transformer:
    q_lora = name.endswith("+q_lora")  # DeepSeek-V2/V3 with the query's low-rank projection (wq_a, wq_b)
    name = name.removesuffix("+q_lora")
    hf = {**CONFIGS[name], **TINY[name]}
    if name == "deepseek-v2-lite":
        hf.update(qk_rope_head_dim=16)  # the fused MLA kernel wants power-of-two dims >= 16
    if q_lora:
        hf.update(q_lora_rank=32)
    fam = family_from_config(hf, max_context=64)
    torch.manual_seed(seed)
    m = Transformer(fam.config).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def _steps(m, prompt, pad, fused: str, kernels_mode: str, monkeypatch, n=3):
    import kernels

    monkeypatch.setenv("MOECODER_FUSED_DECODE", fused)
    monkeypatch.setenv("MOECODER_KERNELS", kernels_mode)
    calls = []
    real = kernels.add_rms_norm
    monkeypatch.setattr(kernels, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = m.setup_cache(prompt.shape[0], 24)
    cache.set_padding(pad)
    out = []
    with torch.no_grad():
        logits = m(prompt, 0, cache, last_only=True)
        tok = logits[:, -1:].argmax(-1)
        calls.clear()  # the prefill's RMSNorms take the kernel too on the Triton path; count the steps'
        for i in range(n):
            lg = m.decode_static(tok, torch.tensor([prompt.shape[1] + i]), cache)
            out.append(lg)
            tok = lg[:, -1:].argmax(-1)
    # the fused step ran (2 add+norm kernels per layer and one before the first), or did not
    assert len(calls) == (n * (2 * len(m.layers) + 1) if fused == "1" else 0)
    monkeypatch.setattr(kernels, "add_rms_norm", real)
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite"])
@pytest.mark.parametrize("pad", [None, [0, 3]])
def test_fused_static_decode_same_logits(name, pad, monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU model: needs the Triton interpreter (the GPU runs tests/test_decode_kernels.py)")
    m = _model(name, 0)
    assert all(b.attn.fused_decode_ok() for b in m.layers)
    prompt = torch.randint(0, 512, (2, 7))
    plain = _steps(m, prompt, pad, "0", "reference", monkeypatch)
    ref = _steps(m, prompt, pad, "1", "reference", monkeypatch)
    tri = _steps(m, prompt, pad, "1", "triton", monkeypatch)
    assert (ref - plain).abs().max().item() <= 1e-4
    assert (tri - plain).abs().max().item() <= 1e-4
    # the ordinary (non-static) cached decode agrees too
    monkeypatch.setenv("MOECODER_KERNELS", "reference")
    cache = m.setup_cache(2, 24)
    cache.set_padding(pad)
    with torch.no_grad():
        lg = m(prompt, 0, cache, last_only=True)
        tok = lg[:, -1:].argmax(-1)
        first = m(tok, prompt.shape[1], cache)
    assert (first[:, -1] - plain[:, 0]).abs().max().item() <= 1e-4


def test_fused_decode_env_and_fallback(monkeypatch):
    m = _model("qwen3-30b-a3b", 1)
    tok = torch.zeros(1, 1, dtype=torch.long)
    monkeypatch.setenv("MOECODER_FUSED_DECODE", "auto")
    assert m.fused_decode(tok) is False  # CPU tensors: the kernels take the reference path
    monkeypatch.setenv("MOECODER_FUSED_DECODE", "1")
    assert m.fused_decode(tok) is True
    m.layers[0].attn.clip = 1.0  # clipping is not covered: the plain step runs
    assert m.fused_decode(tok) is False
    monkeypatch.setenv("MOECODER_FUSED_DECODE", "yes")
    with pytest.raises(ValueError, match="MOECODER_FUSED_DECODE"):
        m.fused_decode(tok)


def test_qkv_views_share_storage(monkeypatch):
    """The fused QKV matrix holds wq, wk, wv as views: no second copy, state_dict unchanged."""
    m = _model("qwen3-30b-a3b", 2)
    attn = m.layers[0].attn
    before = {k: v.clone() for k, v in m.state_dict().items()}
    w, _ = attn._qkv_weight()
    assert attn.wq.weight.data_ptr() == w.data_ptr()
    assert attn.wk.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert attn._qkv_weight()[0] is w  # built once


def test_prepare_static_fixes_the_weights_before_a_capture(monkeypatch):
    """A graph captured before the first fused decode step (a prefill's) reads wq/wk/wv where they
    are: prepare_static builds the fused QKV matrix first, so the step moves no weight after."""
    m = _model("qwen3-30b-a3b", 3)
    m.prepare_static()
    ptrs = [(b.attn.wq.weight.data_ptr(), b.attn.wk.weight.data_ptr(), b.attn.wv.weight.data_ptr()) for b in m.layers]
    assert all(p[0] == b.attn._qkv[1].data_ptr() for p, b in zip(ptrs, m.layers))
    monkeypatch.setenv("MOECODER_FUSED_DECODE", "1")
    monkeypatch.setenv("MOECODER_KERNELS", "reference")
    cache = m.setup_cache(1, 16)
    with torch.no_grad():
        m.decode_static(torch.zeros(1, 1, dtype=torch.long), torch.tensor([0]), cache)
    assert ptrs == [(b.attn.wq.weight.data_ptr(), b.attn.wk.weight.data_ptr(), b.attn.wv.weight.data_ptr())
                    for b in m.layers]


def test_rms_norm_takes_the_kernel_in_inference_on_the_triton_path(monkeypatch):
    """Prefill's RMSNorms: one Triton kernel when nothing needs gradients, the same numbers;
    training keeps the differentiable path."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU: needs the Triton interpreter")
    import kernels
    from model.layers import RMSNorm

    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 64)
    calls = []
    real = kernels.add_rms_norm
    monkeypatch.setattr(kernels, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("MOECODER_KERNELS", "reference")
    with torch.no_grad():
        ref = norm(x)
    assert not calls
    monkeypatch.setenv("MOECODER_KERNELS", "triton")
    with torch.no_grad():
        tri = norm(x)
    assert calls == [1] and (tri - ref).abs().max().item() <= 1e-5
    y = norm(x.requires_grad_())  # training: the autograd path
    assert len(calls) == 1 and y.requires_grad


def test_rope_takes_the_kernel_in_inference_on_the_triton_path(monkeypatch):
    """Prefill's RoPE: one Triton kernel when nothing needs gradients, the same numbers as the
    eager rotation; training keeps the differentiable path."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU: needs the Triton interpreter")
    import kernels
    from model.layers import apply_rope, rope_tables

    cos, sin = rope_tables(32, 16, 10000.0)
    x = torch.randn(2, 7, 4, 32).transpose(1, 2)  # [B, H, T, Dh] as the attention makes it
    calls = []
    real = kernels.rope
    monkeypatch.setattr(kernels, "rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("MOECODER_KERNELS", "reference")
    with torch.no_grad():
        want = apply_rope(x, cos[None, :7], sin[None, :7])
    assert not calls
    monkeypatch.setenv("MOECODER_KERNELS", "triton")
    with torch.no_grad():
        got = apply_rope(x, cos[None, :7], sin[None, :7])
    assert calls == [1] and (got - want).abs().max().item() <= 1e-5
    y = apply_rope(x.requires_grad_(), cos[None, :7], sin[None, :7])
    assert len(calls) == 1 and y.requires_grad


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite", "deepseek-v2-lite+q_lora"])
def test_batch_one_norm_gemv_same_logits(name, monkeypatch):
    """At batch 1 the fused step runs each attention's input norm inside its first projection
    (kernels.norm_linear: one launch, then the output projection through the same kernel): the
    logits equal the plain step's, under the interpreter and as the references; MOECODER_NORM_GEMV=0
    gives the separate-norm step back; the MLA input projections become views of one matrix."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU model: needs the Triton interpreter (the GPU runs tests/test_decode_kernels.py)")
    import kernels

    m = _model(name, 4)
    m.prepare_static()
    if name.startswith("deepseek"):
        a = m.layers[0].attn
        first = a.wq_a if name.endswith("+q_lora") else a.wq
        assert first.weight.data_ptr() == a._qa_kva[1].data_ptr()
        assert a.wkv_a.weight.untyped_storage().data_ptr() == a._qa_kva[1].untyped_storage().data_ptr()
    prompt = torch.randint(0, 512, (1, 6))
    calls = []
    real = kernels.norm_linear
    monkeypatch.setattr(kernels, "norm_linear", lambda *a, **k: calls.append(a[2] is not None) or real(*a, **k))
    plain = _steps(m, prompt, None, "0", "reference", monkeypatch)
    assert calls == []
    outs = {}
    for mode in ("reference", "triton"):
        calls.clear()
        monkeypatch.setenv("MOECODER_NORM_GEMV", "1")
        cache = m.setup_cache(1, 24)
        monkeypatch.setenv("MOECODER_FUSED_DECODE", "1")
        monkeypatch.setenv("MOECODER_KERNELS", mode)
        with torch.no_grad():
            tok = m(prompt, 0, cache, last_only=True)[:, -1:].argmax(-1)
            calls.clear()
            steps = []
            for i in range(3):
                lg = m.decode_static(tok, torch.tensor([prompt.shape[1] + i]), cache)
                steps.append(lg)
                tok = lg[:, -1:].argmax(-1)
        outs[mode] = torch.cat(steps, 1)
        # per step and layer: the input projection with the norm, the output projection without
        assert calls == [True, False] * (3 * len(m.layers)), mode
        assert (outs[mode] - plain).abs().max().item() <= 1e-4, mode
    monkeypatch.setenv("MOECODER_NORM_GEMV", "0")
    calls.clear()
    off = _steps(m, prompt, None, "1", "reference", monkeypatch)
    assert calls == [] and (off - plain).abs().max().item() <= 1e-4
    monkeypatch.setenv("MOECODER_NORM_GEMV", "2")
    with pytest.raises(ValueError, match="MOECODER_NORM_GEMV"):
        m.norm_gemv()


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "deepseek-v2-lite"])
def test_prefill_with_fused_norms_same_logits(name, monkeypatch):
    """The inference forward on the Triton path with the residual adds inside the norms (and MLA's keys
    from ``kernels.mla_keys``) gives the plain forward's logits: whole prompt, last position, a device
    index and the head's input; the fused path really ran (one add+norm per sub-block and the final one)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU model: needs the Triton interpreter")
    import kernels

    m = _model(name, 1)
    prompt = torch.randint(0, 512, (2, 9))
    monkeypatch.setenv("MOECODER_KERNELS", "triton")
    real_norm, real_keys, calls = kernels.add_rms_norm, kernels.mla_keys, {"norm": 0, "keys": 0}

    block_norms = {id(n.weight) for b in m.layers for n in (b.attn_norm, b.ffn_norm)} | {id(m.norm.weight)}

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += key == "keys" or id(a[2]) in block_norms  # not the QK-norms inside attention
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(kernels, "add_rms_norm", count("norm", real_norm))
    monkeypatch.setattr(kernels, "mla_keys", count("keys", real_keys))
    outs = {}
    for fused in ("0", "1"):
        monkeypatch.setenv("MOECODER_FUSED_NORMS", fused)
        monkeypatch.setenv("MOECODER_MLA_KEYS", fused)
        calls.update(norm=0, keys=0)
        with torch.no_grad():
            outs[fused] = (m(prompt), m(prompt, last_only=True), m(prompt, last_index=torch.tensor([4])),
                           m(prompt, head=False))
        if fused == "1":
            assert calls["norm"] == 4 * (2 * len(m.layers) + 1)
            assert calls["keys"] == (4 * len(m.layers) if name == "deepseek-v2-lite" else 0)
        else:
            assert calls["keys"] == 0
    for a, b in zip(outs["0"], outs["1"]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the final norm's forward hook (how the decode's memory mix reads the head's input) fires on the fused path
    seen = []
    hook = m.norm.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            m(prompt, last_only=True)
    finally:
        hook.remove()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], outs["1"][3][:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["1"][1], outs["1"][0][:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["1"][2], outs["1"][0][:, 4:5], rtol=1e-5, atol=1e-5)
