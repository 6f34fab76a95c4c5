"""Triton kernels of a fused single-token decode step (issue #12): raw launchers, no autograd.

A decode step at batch 1 is latency-bound: the eager attention half of a block is dozens of
tiny kernels (casts, norm, RoPE halves, cache writes, the SDPA math path). These replace them
with three launches per block besides the GEMVs:

- ``add_rms_norm``: h = x + delta (rounded to x's dtype), y = RMSNorm(h) * w — the residual add
  of one sub-block fused with the norm of the next.
- ``qk_rope_cache``: per-head RMSNorm of q and k (optional), RoPE on both, k and v written into
  the static cache at slot ``pos`` (a device tensor: CUDA-graph safe), rotated q returned.
- ``decode_attention``: one query token per row against the cache slots ``pad[b] <= s <= pos``
  (and its own slot), online softmax in fp32; the keys may be split in two parts (MLA: latent
  and rotary key) and the values may be the first key part (MLA). The cache length is split over
  about two programs per SM (flash-decoding) and a second launch combines the splits: one program
  per (row, kv head) left MLA at batch 1 on one SM (2,000 cached tokens: 222 -> 96 us per layer).
- ``norm_linear`` (batch 1): the residual add + RMSNorm of a block's input inside its first
  projection's GEMV (each program recomputes the norm of the small input row), and the output
  projection as the same GEMV: no separate norm launch, no cuBLAS split-K reduce.

Same numerics as the eager path: fp32 arithmetic, the same rounding points (norm output and
rotated vectors rounded to the activation dtype). Under ``TRITON_INTERPRET=1`` they run on CPU
tensors (tests, float32/float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, d2_ptr, w_ptr, h_ptr, y_ptr, D, eps, HAS_DELTA: tl.constexpr,
                         HAS_DELTA2: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=m, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * D + cols, mask=m, other=0.0)
        if HAS_DELTA2:  # delta + delta2 rounded first, as the eager sum of the two parts is
            d2 = tl.load(d2_ptr + row * D + cols, mask=m, other=0.0)
            d = (d.to(ACC) + d2.to(ACC)).to(x_ptr.dtype.element_ty)
        h = (x.to(ACC) + d.to(ACC)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * D + cols, h, mask=m)
    else:
        h = x
    hf = h.to(ACC)
    ms = tl.sum(hf * hf, axis=0) / D
    r = 1.0 / tl.sqrt(ms + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(ACC)
    tl.store(y_ptr + row * D + cols, (hf * r * w).to(y_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x, delta, weight, eps: float, delta2=None):
    """(h, y): h = x + (delta + delta2) (or x when delta is None), y = RMSNorm(h) * weight; rows of the last dim."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    n = x2.shape[0]
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if delta is not None else x2
    d2 = delta.reshape(-1, D).contiguous() if delta is not None else x2
    e2 = delta2.reshape(-1, D).contiguous() if delta is not None and delta2 is not None else d2
    if n:
        _add_rms_norm_kernel[(n,)](x2, d2, e2, weight, h, y, D, float(eps), HAS_DELTA=delta is not None,
                                   HAS_DELTA2=delta is not None and delta2 is not None,
                                   ACC=_acc(x.dtype), BLOCK=triton.next_power_of_2(D))  # fmt: skip
    return h.view(x.shape), y.view(x.shape)


@triton.jit
def _router_kernel(x_ptr, w_ptr, o_ptr, T, E, D, sxt, swe, ACC: tl.constexpr, PREC: tl.constexpr,
                   BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    rm = rows < T
    es = tl.arange(0, BE)
    em = es < E
    ks = tl.arange(0, BK)
    acc = tl.zeros((BT, BE), dtype=ACC)
    for k0 in range(0, D, BK):
        km = (k0 + ks) < D
        a = tl.load(x_ptr + rows[:, None] * sxt + (k0 + ks)[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        b = tl.load(w_ptr + es[None, :] * swe + (k0 + ks)[:, None], mask=km[:, None] & em[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    tl.store(o_ptr + rows[:, None] * E + es[None, :], acc, mask=rm[:, None] & em[None, :])


def router_logits(x_TD, w_ED):
    """Router logits [T, E] in float32 (float64 for float64 inputs): x @ W^T with the products
    accumulated in fp32 straight from x's dtype, no float32 copy of x first (the eager router's
    cast + fp32 GEMM). Equal to ``F.linear(x.float(), W.float())`` up to summation order where both
    are bf16: every bf16 product is exact in fp32."""
    T, D = x_TD.shape
    E = w_ED.shape[0]
    assert x_TD.dtype == w_ED.dtype and x_TD.stride(1) == 1 and w_ED.stride(1) == 1
    out = torch.empty((T, E), dtype=torch.float64 if x_TD.dtype == torch.float64 else torch.float32,
                      device=x_TD.device)
    if T == 0:
        return out
    from kernels.triton_ops import INTERPRET

    BE = max(16, triton.next_power_of_2(E))
    BT = 16 if INTERPRET else 32
    _router_kernel[(triton.cdiv(T, BT),)](
        x_TD, w_ED, out, T, E, D, x_TD.stride(0), w_ED.stride(0), ACC=_acc(x_TD.dtype),
        PREC="ieee" if x_TD.dtype in (torch.float32, torch.float64) else None,
        BT=BT, BE=BE, BK=32 if BE > 128 else 64, num_warps=8 if BE > 128 else 4,
    )  # fmt: skip
    return out


@triton.jit
def _mla_keys_kernel(kv_ptr, pe_ptr, k_ptr, L, H, skv_b, skv_l, skv_h, spe_b, spe_l, sk_b, sk_l, sk_h,
                     DN: tl.constexpr, DR: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                     BLOCK_H: tl.constexpr):  # fmt: skip
    bl = tl.program_id(0).to(tl.int64)
    b, l = bl // L, bl % L
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    hm = (h < H)[:, None]
    i = tl.arange(0, BN)[None, :]
    im = hm & (i < DN)
    x = tl.load(kv_ptr + b * skv_b + l * skv_l + h[:, None] * skv_h + i, mask=im)
    dst = k_ptr + b * sk_b + l * sk_l + h[:, None] * sk_h
    tl.store(dst + i, x, mask=im)
    r = tl.arange(0, BR)
    pe = tl.load(pe_ptr + b * spe_b + l * spe_l + r, mask=r < DR)
    tl.store(dst + DN + r[None, :], tl.broadcast_to(pe[None, :], (BLOCK_H, BR)), mask=hm & (r[None, :] < DR))


def mla_keys(kv_BLHX, pe_BLR, nope_dim: int):
    """MLA prefill keys [B, L, H, nope + rope] (contiguous): each head's non-rotary key (the first
    ``nope_dim`` of ``kv``'s last dim) and the shared rotary key, in one pass (no broadcast + cat)."""
    B, L, H, X = kv_BLHX.shape
    R = pe_BLR.shape[-1]
    assert kv_BLHX.stride(-1) == 1 and pe_BLR.stride(-1) == 1 and pe_BLR.shape[:2] == (B, L)
    k = torch.empty((B, L, H, nope_dim + R), dtype=kv_BLHX.dtype, device=kv_BLHX.device)
    if B * L == 0 or H == 0:
        return k
    bn = triton.next_power_of_2(nope_dim)
    bh = min(triton.next_power_of_2(H), max(1, 4096 // bn))
    _mla_keys_kernel[(B * L, triton.cdiv(H, bh))](
        kv_BLHX, pe_BLR.to(kv_BLHX.dtype), k, L, H, kv_BLHX.stride(0), kv_BLHX.stride(1), kv_BLHX.stride(2),
        pe_BLR.stride(0), pe_BLR.stride(1), k.stride(0), k.stride(1), k.stride(2),
        DN=nope_dim, DR=R, BN=bn, BR=triton.next_power_of_2(R), BLOCK_H=bh,
    )  # fmt: skip
    return k


_GEMV_GPU = [  # (rows of W per program, K chunk, warps): 32 KB or 16 KB of bf16 weights per step
    dict(BN=8, BK=2048, w=8), dict(BN=4, BK=4096, w=8), dict(BN=16, BK=1024, w=8),
    dict(BN=4, BK=2048, w=4), dict(BN=2, BK=4096, w=4), dict(BN=8, BK=1024, w=4),
]


def _gemv_configs():
    from kernels.triton_ops import INTERPRET

    if INTERPRET:
        return [triton.Config(dict(BN=4, BK=16), num_warps=1)]
    return [triton.Config(dict(BN=c["BN"], BK=c["BK"]), num_warps=c["w"]) for c in _GEMV_GPU]


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "HAS_NORM"])
@triton.heuristics(dict(ONE_CHUNK=lambda a: a["K"] <= a["BK"]))
@triton.jit
def _norm_gemv_kernel(x_ptr, d_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, h_ptr, N, K, eps, stride_w,
                      HAS_DELTA: tl.constexpr, HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, ONE_CHUNK: tl.constexpr):  # fmt: skip
    """One token: y = RMSNorm(x + delta) * nw @ W^T (+ b). Every program computes the norm of the
    (small) input row itself, so no separate norm launch runs before the GEMV; program 0 writes
    h = x + delta. The rounding points are the eager path's: h and the normed row in x's dtype."""
    pid = tl.program_id(0)
    ns = pid * BN + tl.arange(0, BN)
    nm = ns < N
    dt = x_ptr.dtype.element_ty
    if ONE_CHUNK:  # the weight tile's loads go out first, the norm's pass over the input overlaps them
        ks0 = tl.arange(0, BK)
        w0 = tl.load(w_ptr + ns[:, None].to(tl.int64) * stride_w + ks0[None, :], mask=nm[:, None] & (ks0 < K)[None, :],
                     other=0.0)  # fmt: skip
    rstd = 1.0
    if HAS_NORM:
        ss = tl.zeros((BK,), dtype=ACC)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            km = ks < K
            h = tl.load(x_ptr + ks, mask=km, other=0.0)
            if HAS_DELTA:
                h = (h.to(ACC) + tl.load(d_ptr + ks, mask=km, other=0.0).to(ACC)).to(dt)
                if pid == 0:
                    tl.store(h_ptr + ks, h, mask=km)
            hf = h.to(ACC)
            ss += hf * hf
        rstd = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    acc = tl.zeros((BN,), dtype=ACC)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        km = ks < K
        if ONE_CHUNK:
            w = w0
        else:
            w = tl.load(w_ptr + ns[:, None].to(tl.int64) * stride_w + ks[None, :], mask=nm[:, None] & km[None, :],
                        other=0.0)  # fmt: skip
        xk = tl.load(x_ptr + ks, mask=km, other=0.0)
        if HAS_DELTA:
            xk = (xk.to(ACC) + tl.load(d_ptr + ks, mask=km, other=0.0).to(ACC)).to(dt)
        if HAS_NORM:
            xk = (xk.to(ACC) * rstd * tl.load(nw_ptr + ks, mask=km, other=0.0).to(ACC)).to(dt)
        acc += tl.sum(w.to(ACC) * xk.to(ACC)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=nm, other=0.0).to(ACC)
    tl.store(y_ptr + ns, acc.to(y_ptr.dtype.element_ty), mask=nm)


def norm_linear(x, delta, norm_weight, eps: float, weight, bias=None):
    """One token row: (y, h) with h = x + delta (x when ``delta`` is None), y = RMSNorm(h) * norm_weight
    @ weight^T + bias (no norm when ``norm_weight`` is None). x, delta [1, K] or [K]; weight [N, K] with
    unit stride along K; y [1, N] in x's dtype."""
    K = x.shape[-1]
    N = weight.shape[0]
    assert x.numel() == K and weight.shape[1] == K and weight.stride(1) == 1
    x1 = x.reshape(K).contiguous()
    d1 = delta.reshape(K).contiguous() if delta is not None else x1
    h = torch.empty_like(x1) if delta is not None else x1
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    if delta is not None and norm_weight is None:  # h is written by the norm's first pass
        x1 = h.copy_(x1 + d1)
        delta = None
    nw = norm_weight if norm_weight is not None else x1
    _norm_gemv_kernel[lambda m: (triton.cdiv(N, m["BN"]),)](
        x1, d1, nw, weight, bias if bias is not None else weight, y, h, N, K, float(eps), weight.stride(0),
        HAS_DELTA=delta is not None, HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, ACC=_acc(x.dtype),
    )  # fmt: skip
    return y.view(1, N), h.view(1, K)


@triton.jit
def _qk_rope_cache_kernel(
    qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, q_ptr, pos_ptr,
    H, G, eps, stride_qkv, stride_cos, stride_kb, stride_kg, stride_kl, stride_vb, stride_vg, stride_vl,
    HAS_NORM: tl.constexpr, ACC: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)  # head: [0, H) queries, [H, H+G) keys, [H+G, H+2G) values
    pos = tl.load(pos_ptr).to(tl.int64)
    i = tl.arange(0, HALF)
    base = qkv_ptr + b * stride_qkv + j * (2 * HALF)
    x1 = tl.load(base + i)
    x2 = tl.load(base + HALF + i)
    dt = x1.dtype
    if j >= H + G:  # value head: straight into the cache
        g = j - H - G
        dst = vc_ptr + b * stride_vb + g * stride_vg + pos * stride_vl
        tl.store(dst + i, x1.to(vc_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, x2.to(vc_ptr.dtype.element_ty))
    else:
        a1 = x1.to(ACC)
        a2 = x2.to(ACC)
        if HAS_NORM:
            ms = (tl.sum(a1 * a1, axis=0) + tl.sum(a2 * a2, axis=0)) / (2 * HALF)
            r = 1.0 / tl.sqrt(ms + eps)
            if j < H:
                w1 = tl.load(qw_ptr + i).to(ACC)
                w2 = tl.load(qw_ptr + HALF + i).to(ACC)
            else:
                w1 = tl.load(kw_ptr + i).to(ACC)
                w2 = tl.load(kw_ptr + HALF + i).to(ACC)
            a1 = (a1 * r * w1).to(dt).to(ACC)  # the norm's output is rounded (as in the eager path)
            a2 = (a2 * r * w2).to(dt).to(ACC)
        c = tl.load(cos_ptr + b * stride_cos + i).to(ACC)
        s = tl.load(sin_ptr + b * stride_cos + i).to(ACC)
        o1 = a1 * c - a2 * s
        o2 = a2 * c + a1 * s
        if j < H:
            dst = q_ptr + (b * H + j) * (2 * HALF)
            tl.store(dst + i, o1.to(dt))
            tl.store(dst + HALF + i, o2.to(dt))
        else:
            g = j - H
            dst = kc_ptr + b * stride_kb + g * stride_kg + pos * stride_kl
            tl.store(dst + i, o1.to(dt).to(kc_ptr.dtype.element_ty))
            tl.store(dst + HALF + i, o2.to(dt).to(kc_ptr.dtype.element_ty))


def qk_rope_cache(qkv_BX, q_weight, k_weight, cos_Bd, sin_Bd, k_cache, v_cache, pos, n_heads: int,
                  n_kv_heads: int, eps: float):
    """Rotated queries [B, H, Dh]; keys (normed, rotated) and values written to the caches
    [B, G, L, Dh] at slot ``pos`` ([1] long tensor). ``qkv_BX``: [B, (H + 2G) * Dh] for one token."""
    B = qkv_BX.shape[0]
    Dh = k_cache.shape[-1]
    H, G = n_heads, n_kv_heads
    assert qkv_BX.shape[1] == (H + 2 * G) * Dh and qkv_BX.stride(1) == 1 and Dh & (Dh - 1) == 0
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = torch.empty((B, H, Dh), dtype=qkv_BX.dtype, device=qkv_BX.device)
    cos = cos_Bd.reshape(-1, Dh // 2).expand(B, Dh // 2)
    sin = sin_Bd.reshape(-1, Dh // 2).expand(B, Dh // 2)
    has_norm = q_weight is not None
    _qk_rope_cache_kernel[(B, H + 2 * G)](
        qkv_BX, q_weight if has_norm else qkv_BX, k_weight if has_norm else qkv_BX, cos, sin, k_cache, v_cache, q,
        pos, H, G, float(eps), qkv_BX.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HAS_NORM=has_norm, ACC=_acc(qkv_BX.dtype), HALF=Dh // 2,
    )  # fmt: skip
    return q


@triton.jit
def _mla_rope_cache_kernel(
    q_ptr, ckv_ptr, w_ptr, cos_ptr, sin_ptr, cc_ptr, pc_ptr, qpe_ptr, pos_ptr, H, R, DN, eps,
    stride_q, stride_ckv, stride_cos, stride_cb, stride_cl, stride_pb, stride_pl,
    ACC: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)  # [0, H): a query head's rotary part; H: the latent and the rotary key
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + b * stride_cos + i).to(ACC)
    s = tl.load(sin_ptr + b * stride_cos + i).to(ACC)
    if j < H:
        src = q_ptr + b * stride_q + j * (DN + 2 * HALF) + DN
        dst = qpe_ptr + (b * H + j) * (2 * HALF)
    else:
        pos = tl.load(pos_ptr).to(tl.int64)
        src = ckv_ptr + b * stride_ckv + R
        dst = pc_ptr + b * stride_pb + pos * stride_pl
        rr = tl.arange(0, BLOCK_R)
        rm = rr < R
        lat = tl.load(ckv_ptr + b * stride_ckv + rr, mask=rm, other=0.0)
        a = lat.to(ACC)
        r = 1.0 / tl.sqrt(tl.sum(a * a, axis=0) / R + eps)
        w = tl.load(w_ptr + rr, mask=rm, other=0.0).to(ACC)
        tl.store(cc_ptr + b * stride_cb + pos * stride_cl + rr,
                 (a * r * w).to(lat.dtype).to(cc_ptr.dtype.element_ty), mask=rm)
    x1 = tl.load(src + i)
    x2 = tl.load(src + HALF + i)
    a1 = x1.to(ACC)
    a2 = x2.to(ACC)
    tl.store(dst + i, (a1 * c - a2 * s).to(x1.dtype).to(dst.dtype.element_ty))
    tl.store(dst + HALF + i, (a2 * c + a1 * s).to(x1.dtype).to(dst.dtype.element_ty))


def mla_rope_cache(q_BX, ckv_BX, norm_weight, eps: float, cos_Bd, sin_Bd, c_cache, pe_cache, pos,
                   n_heads: int, nope_dim: int):
    """MLA, one decode token: the latent ``ckv[:, :R]`` RMSNorm-ed into ``c_cache`` [B, 1, L, R] and the
    rotary key ``ckv[:, R:]`` rotated into ``pe_cache`` [B, 1, L, Dr] at slot ``pos``; returns the
    rotated rotary part of every query head [B, H, Dr]. ``q_BX``: [B, H * (nope_dim + Dr)]."""
    B = q_BX.shape[0]
    R, Dr = c_cache.shape[-1], pe_cache.shape[-1]
    H = n_heads
    assert q_BX.shape[1] == H * (nope_dim + Dr) and ckv_BX.shape[1] == R + Dr and Dr & (Dr - 1) == 0
    assert q_BX.stride(1) == 1 and ckv_BX.stride(1) == 1 and c_cache.stride(-1) == 1 and pe_cache.stride(-1) == 1
    qpe = torch.empty((B, H, Dr), dtype=q_BX.dtype, device=q_BX.device)
    cos = cos_Bd.reshape(-1, Dr // 2).expand(B, Dr // 2)
    sin = sin_Bd.reshape(-1, Dr // 2).expand(B, Dr // 2)
    _mla_rope_cache_kernel[(B, H + 1)](
        q_BX, ckv_BX, norm_weight, cos, sin, c_cache, pe_cache, qpe, pos, H, R, nope_dim, float(eps),
        q_BX.stride(0), ckv_BX.stride(0), cos.stride(0), c_cache.stride(0), c_cache.stride(2),
        pe_cache.stride(0), pe_cache.stride(2), ACC=_acc(q_BX.dtype), HALF=Dr // 2,
        BLOCK_R=triton.next_power_of_2(R),
    )  # fmt: skip
    return qpe


@triton.jit
def _decode_attn_kernel(
    q_ptr, q2_ptr, k1_ptr, k2_ptr, v_ptr, o_ptr, pm_ptr, pa_ptr, pos_ptr, pad_ptr, H, R, scale, CH,
    stride_qb, stride_qh, stride_q2b, stride_q2h, stride_k1b, stride_k1g, stride_k1l, stride_k2b, stride_k2g, stride_k2l,
    stride_vb, stride_vg, stride_vl, stride_ob, stride_oh,
    HAS_K2: tl.constexpr, HAS_PAD: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    SPLIT: tl.constexpr,
):  # fmt: skip
    """Program (b, kv head g, split sp): the R query heads of g over slots [sp * CH, (sp + 1) * CH)
    up to ``pos``. One split: the output. Several (flash-decoding): the split's running max, sum
    and unnormalised output into the partials, combined by ``_decode_attn_combine``."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    pos = tl.load(pos_ptr).to(tl.int64)
    pad = tl.load(pad_ptr + b).to(tl.int64) if HAS_PAD else 0
    r = tl.arange(0, BLOCK_R)
    rm = r < R
    heads = g * R + r
    d1 = tl.arange(0, D1)
    q1 = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d1[None, :], mask=rm[:, None], other=0.0)
    if HAS_K2:
        d2 = tl.arange(0, D2)
        q2 = tl.load(q2_ptr + b * stride_q2b + heads[:, None] * stride_q2h + d2[None, :], mask=rm[:, None],
                     other=0.0)
    dv = tl.arange(0, DV)
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=ACC)
    l_i = tl.zeros((BLOCK_R,), dtype=ACC)
    acc = tl.zeros((BLOCK_R, DV), dtype=ACC)
    ls = tl.arange(0, BLOCK_L)
    start = sp * CH
    end = tl.minimum(start + CH, pos + 1)
    for l0 in range(start, end, BLOCK_L):
        slot = l0 + ls
        live = slot < end
        ok = live & ((slot >= pad) | (slot == pos))
        k1 = tl.load(k1_ptr + b * stride_k1b + g * stride_k1g + slot[:, None] * stride_k1l + d1[None, :],
                     mask=live[:, None], other=0.0)
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC, out_dtype=ACC)
        if HAS_K2:
            k2 = tl.load(k2_ptr + b * stride_k2b + g * stride_k2g + slot[:, None] * stride_k2l + d2[None, :],
                         mask=live[:, None], other=0.0)
            s += tl.dot(q2, tl.trans(k2), input_precision=PREC, out_dtype=ACC)
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no visible slot
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * stride_vb + g * stride_vg + slot[:, None] * stride_vl + dv[None, :],
                    mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    if SPLIT:  # partials [B, G, NS, BLOCK_R] (max, sum) and [B, G, NS, BLOCK_R, DV]
        idx = (b * tl.num_programs(1) + g) * tl.num_programs(2) + sp
        tl.store(pm_ptr + (idx * 2) * BLOCK_R + r, m_i)
        tl.store(pm_ptr + (idx * 2 + 1) * BLOCK_R + r, l_i)
        tl.store(pa_ptr + (idx * BLOCK_R + r[:, None]) * DV + dv[None, :], acc)
    else:
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + dv[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rm[:, None])


@triton.jit
def _decode_attn_combine(pm_ptr, pa_ptr, o_ptr, R, NS, stride_ob, stride_oh,
                         BLOCK_R: tl.constexpr, DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):  # fmt: skip
    """Program (b, head, block of DV): the splits' partial outputs rescaled to their common max and summed."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    j = tl.program_id(2)
    G = tl.num_programs(1) // R
    g = h // R
    r = h % R
    ss = tl.arange(0, BLOCK_S)
    sm = ss < NS
    idx = (b * G + g) * NS + ss
    m = tl.load(pm_ptr + (idx * 2) * BLOCK_R + r, mask=sm, other=float("-inf"))
    lsum = tl.load(pm_ptr + (idx * 2 + 1) * BLOCK_R + r, mask=sm, other=0.0)
    mx = tl.max(m, axis=0)
    f = tl.where(sm & (m > float("-inf")), tl.exp(m - mx), 0.0)
    dv = j * BLOCK_DV + tl.arange(0, BLOCK_DV)
    a = tl.load(pa_ptr + (idx[:, None] * BLOCK_R + r) * DV + dv[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(a * f[:, None], axis=0) / tl.sum(lsum * f, axis=0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + dv, out.to(o_ptr.dtype.element_ty))


def _prec(dtype):
    return "ieee" if dtype in (torch.float32, torch.float64) else None


_N_SM: dict = {}
MAX_SPLITS = 64


def _splits(device, L: int, BLOCK_L: int, BG: int) -> int:
    """Splits of the cache length: about two programs per SM over B * G, each at least BLOCK_L slots.
    MOECODER_ATTN_SPLITS=N fixes N (1: one program per (row, kv head), the earlier kernel; for A/B runs)."""
    import os

    from kernels.triton_ops import INTERPRET

    v = os.environ.get("MOECODER_ATTN_SPLITS", "").strip()
    if v:
        if not v.isdigit() or int(v) < 1:
            raise ValueError(f"MOECODER_ATTN_SPLITS must be a positive integer; got {v!r}")
        return min(int(v), triton.cdiv(L, BLOCK_L))

    if INTERPRET or device.type != "cuda":
        n_sm = 2  # the interpreter: a few splits, so that the tests take the split path
    else:
        n_sm = _N_SM.get(device.index)
        if n_sm is None:
            n_sm = _N_SM[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(L, BLOCK_L), triton.cdiv(2 * n_sm, BG), MAX_SPLITS))


def decode_attention(q_BHD, k1_BGLD, v_BGLD, pos, pad_B=None, scale=None, k2_BGLD=None, q2_BHD=None, splits=None):
    """Attention of one query token per row over cache slots s with pad[b] <= s <= pos (and s == pos).

    q [B, H, D1 (+ D2)]; keys k1 [B, G, L, D1] (and k2 [B, G, L, D2], concatenated along the
    feature dim); values [B, G, L, DV]; query head h reads kv head h // (H / G). -> [B, H, DV].
    ``q2_BHD`` [B, H, D2]: the query's second part as its own tensor (then q is [B, H, D1]).
    The cache length is split over ``splits`` programs per (b, kv head) (default: about two programs
    per SM, flash-decoding) and the partial results combined by a second launch; with one split the
    first launch writes the output.
    """
    if q2_BHD is not None:
        q1 = q_BHD
    else:
        D1_ = k1_BGLD.shape[3]
        q1, q2_BHD = q_BHD[..., :D1_], q_BHD[..., D1_:]
    B, H, D1q = q1.shape
    G, L, D1 = k1_BGLD.shape[1], k1_BGLD.shape[2], k1_BGLD.shape[3]
    D2 = k2_BGLD.shape[3] if k2_BGLD is not None else 0
    DV = v_BGLD.shape[3]
    Dq = D1q + q2_BHD.shape[2]
    assert D1q == D1 and Dq == D1 + D2 and H % G == 0 and q1.stride(2) == 1
    assert D2 == 0 or q2_BHD.stride(2) == 1
    for t in (k1_BGLD, v_BGLD) + ((k2_BGLD,) if k2_BGLD is not None else ()):
        assert t.stride(3) == 1
    for d in (D1, DV) + ((D2,) if D2 else ()):
        assert d & (d - 1) == 0 and d >= 16, "head dims must be powers of two >= 16"
    R = H // G
    scale = Dq ** -0.5 if scale is None else scale
    o = torch.empty((B, H, DV), dtype=q1.dtype, device=q1.device)
    k2 = k2_BGLD if k2_BGLD is not None else k1_BGLD
    q2 = q2_BHD if D2 else q1
    big = max(D1 + D2, DV)
    BLOCK_L = 32 if big > 256 else 64
    BLOCK_R = max(16, triton.next_power_of_2(R))
    NS = splits if splits is not None else _splits(q1.device, L, BLOCK_L, B * G)
    CH = triton.cdiv(triton.cdiv(L, NS), BLOCK_L) * BLOCK_L
    NS = triton.cdiv(L, CH)
    acc_dt = torch.float64 if q1.dtype == torch.float64 else torch.float32
    pm = torch.empty((B * G * NS * 2 * BLOCK_R,) if NS > 1 else (1,), dtype=acc_dt, device=q1.device)
    pa = torch.empty((B * G * NS * BLOCK_R * DV,) if NS > 1 else (1,), dtype=acc_dt, device=q1.device)
    _decode_attn_kernel[(B, G, NS)](
        q1, q2, k1_BGLD, k2, v_BGLD, o, pm, pa, pos, pad_B if pad_B is not None else pos, H, R, float(scale), CH,
        q1.stride(0), q1.stride(1), q2.stride(0), q2.stride(1), k1_BGLD.stride(0), k1_BGLD.stride(1), k1_BGLD.stride(2),
        k2.stride(0), k2.stride(1), k2.stride(2), v_BGLD.stride(0), v_BGLD.stride(1), v_BGLD.stride(2),
        o.stride(0), o.stride(1), HAS_K2=k2_BGLD is not None, HAS_PAD=pad_B is not None,
        ACC=_acc(q1.dtype), PREC=_prec(q1.dtype), D1=D1, D2=max(D2, 16), DV=DV,
        BLOCK_R=BLOCK_R, BLOCK_L=BLOCK_L, SPLIT=NS > 1, num_warps=4 if big <= 256 else 8,
    )  # fmt: skip
    if NS > 1:
        BLOCK_S = triton.next_power_of_2(NS)
        BLOCK_DV = min(DV, max(16, 4096 // BLOCK_S))
        _decode_attn_combine[(B, H, DV // BLOCK_DV)](pm, pa, o, R, NS, o.stride(0), o.stride(1), BLOCK_R=BLOCK_R,
                                                     DV=DV, BLOCK_S=BLOCK_S, BLOCK_DV=BLOCK_DV)  # fmt: skip
    return o


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, o_ptr, H, T,
                 sxb, sxh, sxt, scb, sct, sob, soh, sot,
                 ACC: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    bt = tl.program_id(0).to(tl.int64)
    b, t = bt // T, bt % T
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = (h < H)[:, None]
    i = tl.arange(0, HALF)[None, :]
    src = x_ptr + b * sxb + t * sxt + h[:, None].to(tl.int64) * sxh + i
    x1 = tl.load(src, mask=hm, other=0.0)
    x2 = tl.load(src + HALF, mask=hm, other=0.0)
    c = tl.load(cos_ptr + b * scb + t * sct + i).to(ACC)
    s = tl.load(sin_ptr + b * scb + t * sct + i).to(ACC)
    a1, a2 = x1.to(ACC), x2.to(ACC)
    dst = o_ptr + b * sob + t * sot + h[:, None].to(tl.int64) * soh + i
    tl.store(dst, (a1 * c - a2 * s).to(x1.dtype), mask=hm)
    tl.store(dst + HALF, (a2 * c + a1 * s).to(x1.dtype), mask=hm)


def rope(x_BHTD, cos_BTd, sin_BTd, out=None):
    """RoPE (GPT-NeoX halves) over [B, H, T, Dh] of any strides (last dim contiguous) in one launch;
    cos/sin [B or 1, T, Dh/2]. The output keeps x's layout where x is dense (a transposed
    [B, T, H, Dh] view stays one), else it is contiguous; ``out=x`` rotates in place."""
    B, H, T, Dh = x_BHTD.shape
    assert Dh % 2 == 0 and (Dh // 2) & (Dh // 2 - 1) == 0, "head dim must be twice a power of two"
    if out is not None:
        assert out.shape == x_BHTD.shape and out.stride(-1) == 1 and x_BHTD.stride(-1) == 1
    else:
        x_BHTD = x_BHTD if x_BHTD.stride(-1) == 1 else x_BHTD.contiguous()
        out = torch.empty_like(x_BHTD)  # same strides where x is dense
        if out.stride(-1) != 1:
            out = torch.empty(x_BHTD.shape, dtype=x_BHTD.dtype, device=x_BHTD.device)
    cos = cos_BTd.expand(B, T, Dh // 2)
    sin = sin_BTd.expand(B, T, Dh // 2)
    assert cos.stride(-1) == 1 and sin.stride() == cos.stride()
    if B * T == 0 or H == 0:
        return out
    bh = min(triton.next_power_of_2(H), max(1, 2048 // Dh))
    _rope_kernel[(B * T, triton.cdiv(H, bh))](
        x_BHTD, cos, sin, out, H, T, x_BHTD.stride(0), x_BHTD.stride(1), x_BHTD.stride(2), cos.stride(0),
        cos.stride(1), out.stride(0), out.stride(1), out.stride(2),
        ACC=_acc(x_BHTD.dtype), HALF=Dh // 2, BLOCK_H=bh,
    )  # fmt: skip
    return out
