"""The fused single-token decode kernels (kernels.triton_decode) against their references.

On a CPU box they run under the Triton interpreter (tests/conftest.py) in float64 and float32;
on CUDA compiled in bf16. Fresh random inputs; outputs poisoned first; the cache slots other
than ``pos`` must stay untouched.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
pytest.importorskip("triton")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.fail("tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA", pytrace=False)

from kernels import reference as ref  # noqa: E402
from kernels import triton_decode as td  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16] if CUDA else [torch.float64, torch.float32]


def tol(dt):
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dt]


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm(dt, with_delta):
    x = torch.randn(3, 1, 48, device=DEV).to(dt)
    d = torch.randn(3, 1, 48, device=DEV).to(dt) if with_delta else None
    w = torch.rand(48, device=DEV).to(dt) + 0.5
    h, y = td.add_rms_norm(x, d, w, 1e-6)
    hr, yr = ref.add_rms_norm(x, d, w, 1e-6)
    assert rel(h, hr) <= tol(dt) and rel(y, yr) <= tol(dt)
    if with_delta:
        assert rel(h, x.double() + d.double()) <= tol(dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_add_rms_norm_two_deltas(dt):
    """x + (delta + delta2): the sum of a feed-forward's two parts (routed, shared) rounded first, then
    added to the residual, as the eager ``x + (routed + shared)``; delta2 without delta is ignored."""
    x, d, d2 = (torch.randn(5, 2, 48, device=DEV).to(dt) for _ in range(3))
    w = torch.rand(48, device=DEV).to(dt) + 0.5
    h, y = td.add_rms_norm(x, d, w, 1e-6, d2)
    hr, yr = ref.add_rms_norm(x, d + d2, w, 1e-6)
    assert rel(h, hr) <= tol(dt) and rel(y, yr) <= tol(dt)
    assert rel(h, x.double() + d.double() + d2.double()) <= tol(dt)
    h0, y0 = td.add_rms_norm(x, None, w, 1e-6, d2)
    assert torch.equal(h0, x) and rel(y0, ref.add_rms_norm(x, None, w, 1e-6)[1]) <= tol(dt)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("T,E,D", [(37, 6, 40), (64, 64, 128), (3, 160, 96)])
def test_router_logits(dt, T, E, D):
    """The router's logits from x's dtype (no float32 copy of x) equal the float32 linear of the same
    values, for expert counts and widths that are not whole tiles and a row-strided x."""
    x = torch.randn(T, D + 8, device=DEV).to(dt)[:, 4:D + 4]
    w = torch.randn(E, D, device=DEV).to(dt)
    out = td.router_logits(x, w)
    want = torch.nn.functional.linear(x.double(), w.double())
    assert out.shape == (T, E) and out.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
    assert rel(out, want) <= (1e-12 if dt == torch.float64 else 1e-5)
    assert torch.allclose(ref.router_logits(x, w).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("H,dn,dv,dr", [(16, 128, 128, 64), (3, 24, 16, 8)])
def test_mla_keys(dt, H, dn, dv, dr):
    """MLA prefill keys: each head's non-rotary key from the up-projection's output and the shared
    rotary key, for power-of-two and odd dims, with a strided rotary key (a slice of the cache)."""
    B, L = 2, 7
    kv = torch.randn(B, L, H, dn + dv, device=DEV).to(dt)
    pe = torch.randn(B, L + 3, dr, device=DEV).to(dt)[:, 2:L + 2]
    k = td.mla_keys(kv, pe, dn)
    assert k.shape == (B, L, H, dn + dr) and k.is_contiguous()
    assert torch.equal(k, ref.mla_keys(kv, pe, dn))
    assert torch.equal(k[:, :, 1, dn:], pe) and torch.equal(k[..., :dn], kv[..., :dn])


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("delta,norm,bias", [(True, True, False), (False, True, True), (False, False, False),
                                             (True, False, True)])  # fmt: skip
@pytest.mark.parametrize("N,K", [(37, 40), (8, 64)])
def test_norm_linear(dt, delta, norm, bias, N, K):
    """The one-launch add + RMSNorm + GEMV of a decode token gives the eager ops' output and residual,
    with K over several chunks and N not a multiple of the rows per program."""
    x = torch.randn(1, K, device=DEV).to(dt)
    d = torch.randn(1, K, device=DEV).to(dt) if delta else None
    nw = (torch.rand(K, device=DEV) + 0.5).to(dt) if norm else None
    w = (torch.randn(N, K, device=DEV) * K**-0.5).to(dt)
    b = torch.randn(N, device=DEV).to(dt) if bias else None
    y, h = td.norm_linear(x, d, nw, 1e-6, w, b)
    yr, hr = ref.norm_linear(x, d, nw, 1e-6, w, b)
    assert y.shape == (1, N) and h.shape == (1, K) and y.dtype == dt
    assert rel(h, hr) <= tol(dt) and rel(y, yr) <= tol(dt)
    xn = x.double() + (d.double() if delta else 0)
    if norm:
        xn = xn * torch.rsqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-6) * nw.double()
    assert rel(y, xn @ w.double().t() + (b.double() if bias else 0)) <= max(tol(dt), 1e-6)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("B,H,G,Dh", [(1, 4, 2, 16), (2, 6, 3, 32)])
def test_qk_rope_cache(dt, norm, B, H, G, Dh):
    L, pos = 9, 5
    qkv = torch.randn(B, (H + 2 * G) * Dh, device=DEV).to(dt)
    qw = (torch.rand(Dh, device=DEV) + 0.5).to(dt) if norm else None
    kw = (torch.rand(Dh, device=DEV) + 0.5).to(dt) if norm else None
    cos, sin = torch.randn(B, Dh // 2, device=DEV), torch.randn(B, Dh // 2, device=DEV)
    caches = [torch.randn(B, G, L, Dh, device=DEV).to(dt) for _ in range(4)]
    p = torch.tensor([pos], device=DEV)
    q = td.qk_rope_cache(qkv, qw, kw, cos, sin, caches[0], caches[1], p, H, G, 1e-6)
    kc, vc = caches[2].clone(), caches[3].clone()
    kc.copy_(caches[0]), vc.copy_(caches[1])  # slots other than pos start equal
    qr = ref.qk_rope_cache(qkv, qw, kw, cos, sin, caches[2], caches[3], p, H, G, 1e-6)
    assert rel(q, qr) <= tol(dt)
    assert rel(caches[0][:, :, pos], caches[2][:, :, pos]) <= tol(dt)
    assert torch.equal(caches[1][:, :, pos], caches[3][:, :, pos])
    assert torch.equal(caches[1][:, :, pos].reshape(B, -1), qkv[:, (H + G) * Dh:].reshape(B, -1).to(dt))
    others = [i for i in range(L) if i != pos]
    assert torch.equal(caches[0][:, :, others], kc[:, :, others]) and torch.equal(caches[1][:, :, others],
                                                                                   vc[:, :, others])


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("B,H,DN,R,Dr", [(1, 4, 16, 32, 16), (2, 3, 8, 48, 32)])
def test_mla_rope_cache(dt, B, H, DN, R, Dr):
    L, pos = 7, 4
    q = torch.randn(B, H * (DN + Dr), device=DEV).to(dt)
    ckv = torch.randn(B, R + Dr, device=DEV).to(dt)
    w = (torch.rand(R, device=DEV) + 0.5).to(dt)
    cos, sin = torch.randn(B, Dr // 2, device=DEV), torch.randn(B, Dr // 2, device=DEV)
    cc, pc = torch.randn(B, 1, L, R, device=DEV).to(dt), torch.randn(B, 1, L, Dr, device=DEV).to(dt)
    ccr, pcr = cc.clone(), pc.clone()
    qpe = td.mla_rope_cache(q, ckv, w, 1e-6, cos, sin, cc, pc, torch.tensor([pos], device=DEV), H, DN)
    qper = ref.mla_rope_cache(q, ckv, w, 1e-6, cos, sin, ccr, pcr, torch.tensor([pos], device=DEV), H, DN)
    assert qpe.shape == (B, H, Dr) and rel(qpe, qper) <= tol(dt)
    assert rel(cc[:, :, pos], ccr[:, :, pos]) <= tol(dt) and rel(pc[:, :, pos], pcr[:, :, pos]) <= tol(dt)
    assert not torch.equal(cc[:, :, pos], ckv[:, None, :R])  # normed, not copied
    others = [i for i in range(L) if i != pos]
    assert torch.equal(cc[:, :, others], ccr[:, :, others]) and torch.equal(pc[:, :, others], pcr[:, :, others])


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("case", ["gqa", "mha", "mla", "mla_q2", "pad"])
def test_decode_attention(dt, case):
    B, H, G, D1, D2, DV, L = 2, 8, 2, 32, 0, 32, 150
    if case == "mha":
        H, G = 4, 4
    if case.startswith("mla"):
        H, G, D1, D2, DV = 4, 1, 64, 16, 64
    pos = 137
    q = torch.randn(B, H, D1 + D2, device=DEV).to(dt)
    k1 = torch.randn(B, G, L, D1, device=DEV).to(dt)
    k2 = torch.randn(B, G, L, D2, device=DEV).to(dt) if D2 else None
    v = k1 if case.startswith("mla") else torch.randn(B, G, L, DV, device=DEV).to(dt)
    k1[:, :, pos + 1:] = float("nan")  # slots after pos are never read into the result
    if not case.startswith("mla"):
        v[:, :, pos + 1:] = float("nan")
    pad = torch.tensor([0, 70], device=DEV) if case == "pad" else None
    p = torch.tensor([pos], device=DEV)
    k1r = k1.clone()
    k1r[:, :, pos + 1:] = 0
    vr = k1r if case.startswith("mla") else v.clone()
    vr[:, :, pos + 1:] = 0
    orf = ref.decode_attention(q, k1r, vr, p, pad, 0.3, k2)
    # the default split of the cache length, one program per (row, kv head), and flash-decoding splits:
    # 3 (even), 4 (a chunk past pos: an empty split), 5
    for splits in (None, 1, 3, 4, 5):
        if case == "mla_q2":  # the two query parts as separate (strided) tensors
            qq = torch.randn(B, H, D1 + D2 + 8, device=DEV).to(dt)
            qq[..., :D1 + D2] = q
            o = td.decode_attention(qq[..., :D1], k1, v, p, pad, 0.3, k2, q2_BHD=qq[..., D1:D1 + D2], splits=splits)
        else:
            o = td.decode_attention(q, k1, v, p, pad, 0.3, k2, splits=splits)
        assert rel(o, orf) <= tol(dt), splits
    if case == "pad":  # row 1 sees only slots 70..pos: equal to attention over that slice alone
        sl = ref.decode_attention(q[1:], k1r[1:, :, 70:], vr[1:, :, 70:], p - 70, None, 0.3,
                                  k2[1:, :, 70:] if k2 is not None else None)
        assert rel(o[1:], sl) <= tol(dt)


def test_decode_attention_fully_padded_first_block():
    """A row whose first key block is all padding (no NaN from an empty block)."""
    dt = DTYPES[0]
    B, H, G, D, L, pos = 1, 2, 1, 16, 200, 190
    q = torch.randn(B, H, D, device=DEV).to(dt)
    k = torch.randn(B, G, L, D, device=DEV).to(dt)
    v = torch.randn(B, G, L, D, device=DEV).to(dt)
    pad = torch.tensor([150], device=DEV)
    p = torch.tensor([pos], device=DEV)
    want = ref.decode_attention(q, k, v, p, pad)
    for splits in (None, 1, 4):  # with 4 splits the first three see padding only
        assert rel(td.decode_attention(q, k, v, p, pad, splits=splits), want) <= tol(dt), splits


def test_decode_attention_splits_env(monkeypatch):
    """MOECODER_ATTN_SPLITS=N: N flash-decoding splits (at most one per key block), same result; bad values refused."""
    import torch as _t

    dt = DTYPES[0]
    q, k, v = (_t.randn(1, 2, 16, device=DEV).to(dt), _t.randn(1, 1, 200, 16, device=DEV).to(dt),
               _t.randn(1, 1, 200, 16, device=DEV).to(dt))  # fmt: skip
    p = _t.tensor([150], device=DEV)
    want = ref.decode_attention(q, k, v, p)
    launched = []
    real = td._decode_attn_kernel
    monkeypatch.setattr(td, "_decode_attn_kernel", type("K", (), {"__getitem__": lambda self, g: (
        launched.append(g[2]) or real[g])})())  # fmt: skip
    for n, ns in (("1", 1), ("2", 2), ("4", 4), ("99", 4)):  # 200 slots: at most 4 blocks of 64
        monkeypatch.setenv("MOECODER_ATTN_SPLITS", n)
        launched.clear()
        assert rel(td.decode_attention(q, k, v, p), want) <= tol(dt) and launched == [ns], n
    monkeypatch.setenv("MOECODER_ATTN_SPLITS", "0")
    with pytest.raises(ValueError, match="MOECODER_ATTN_SPLITS"):
        td.decode_attention(q, k, v, p)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("layout", ["transposed", "slice", "contiguous"])
@pytest.mark.parametrize("B,H,T,Dh,cos_b", [(1, 3, 5, 16, 1), (2, 40, 3, 32, 2)])
def test_rope_prefill(dt, layout, B, H, T, Dh, cos_b):
    """Prefill RoPE over [B, H, T, Dh] views of the layouts the attention makes: q/k as a
    transposed [B, T, H, Dh] view, MLA's rotary slice of each head, a plain tensor; cos/sin per
    row or broadcast (cos_b == 1). H = 40 is not a power of two (masked head lanes)."""
    if layout == "transposed":
        x = torch.randn(B, T, H, Dh, device=DEV).to(dt).transpose(1, 2)
    elif layout == "slice":
        x = torch.randn(B, T, H, Dh + 8, device=DEV).to(dt).transpose(1, 2)[..., 8:]
    else:
        x = torch.randn(B, H, T, Dh, device=DEV).to(dt)
    cos, sin = torch.randn(cos_b, T, Dh // 2, device=DEV), torch.randn(cos_b, T, Dh // 2, device=DEV)
    got = td.rope(x, cos, sin)
    want = ref.rope(x, cos, sin)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel(got, want) <= tol(dt)
    if layout == "transposed":
        assert got.stride() == x.stride()  # the [B, T, H, Dh] memory layout kept for attention


@pytest.mark.parametrize("dt", DTYPES)
def test_rope_in_place_on_a_slice(dt):
    """MLA's prefill rotates the queries' rotary part where it lies (``out=x``): the rest of each
    head is untouched and the rotated part equals the out-of-place result."""
    q = torch.randn(2, 5, 3, 24 + 16, device=DEV).to(dt).transpose(1, 2)  # [B, H, T, dn + dr]
    before = q.clone()
    cos, sin = torch.randn(1, 5, 8, device=DEV), torch.randn(1, 5, 8, device=DEV)
    want = ref.rope(before[..., 24:], cos, sin)
    got = td.rope(q[..., 24:], cos, sin, out=q[..., 24:])
    assert got.data_ptr() == q[..., 24:].data_ptr()
    assert torch.equal(q[..., :24], before[..., :24])
    assert rel(q[..., 24:], want) <= tol(dt)
