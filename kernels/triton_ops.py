# Longer than 600 lines because it is one module per the kernels room's rule (raw launchers, no
# autograd); each kernel sits next to its launcher and the file reads top to bottom.
"""Triton kernels of the MoE layer (forward and backward pieces).

Raw launchers only: no autograd here (see ``kernels.autograd``). Every launcher takes and
returns torch tensors on one device; under ``TRITON_INTERPRET=1`` they run on CPU tensors.

Grouped GEMMs run over a *tile map*: for row groups given by ``offsets`` (group e is
rows ``offsets[e]:offsets[e+1]``) each tile is (expert, row_start, row_end) of at most
BLOCK_M rows of one group. It is built on the device without a host sync, so groups
need no padding and empty groups cost nothing; the grid is an upper bound and spare
tiles exit at once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(gpu: list[dict], interp: dict) -> list[triton.Config]:
    """One config under the interpreter (or MOECODER_TRITON_AUTOTUNE=0: the first GPU one)."""
    if INTERPRET:
        return [triton.Config(dict(interp), num_warps=4, num_stages=1)]
    if os.environ.get("MOECODER_TRITON_AUTOTUNE", "1") == "0":
        gpu = gpu[:1]
    out = []
    for c in gpu:
        c = dict(c)
        w, s = c.pop("w"), c.pop("s")
        out.append(triton.Config(c, num_warps=w, num_stages=s))
    return out


def _configs_hook(gpu: list[dict], interp: dict, hook) -> list[triton.Config]:
    """``_configs`` with a pre-hook on each config (the TMA kernels size their descriptors' blocks there)."""
    out = _configs(gpu, interp)
    for c in out:
        c.pre_hook = hook
    return out


def tma_mode() -> bool:
    """``MOECODER_TMA=1``: the grouped GEMMs of the forward read their weight tiles through TMA descriptors
    (bf16/fp16 on sm_90+, contiguous weights; other cases keep the pointer kernels). Default 0."""
    return os.environ.get("MOECODER_TMA", "0").strip() == "1"


def _tma_ok(a: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    """Whether a (E, K, N) weight can be read as one 2-D (E*K, N) TMA descriptor: contiguous rows, 16-byte
    aligned base and row stride; bf16/fp16 on a Hopper-or-newer GPU (any dtype under the interpreter)."""
    E, K, N = w_EKN.shape
    if w_EKN.stride(2) != 1 or w_EKN.stride(0) != K * w_EKN.stride(1) or E * K == 0:
        return False
    es = w_EKN.element_size()
    if (w_EKN.stride(1) * es) % 16 or w_EKN.data_ptr() % 16:
        return False
    if INTERPRET:
        return True
    return (a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda
            and torch.cuda.get_device_capability(a.device)[0] >= 9)  # fmt: skip


def _wdesc(w_EKN: torch.Tensor):
    E, K, N = w_EKN.shape
    # block shape placeholder: each config's pre-hook sets (BLOCK_K, BLOCK_N)
    return TensorDescriptor(w_EKN, [E * K, N], [w_EKN.stride(1), 1], [16, 16])


# --------------------------------------------------------------------------------------
# dtype helpers


def _prec(dtype: torch.dtype):
    """tl.dot input precision: exact for fp32/fp64 unless torch allows tf32."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if dtype == torch.float64:
        return "ieee"
    return None


def _acc64(dtype: torch.dtype) -> bool:
    return dtype == torch.float64


# --------------------------------------------------------------------------------------
# routing


@triton.jit
def _scores(logits_ptr, rows, cols, T, E, stride_l, SOFTMAX: tl.constexpr):
    rmask = rows < T
    cmask = cols < E
    x = tl.load(
        logits_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :],
        mask=rmask[:, None] & cmask[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    if SOFTMAX:
        m = tl.max(x, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        ex = tl.exp(x - m[:, None])
        ex = tl.where(cmask[None, :], ex, 0.0)
        s = ex / tl.maximum(tl.sum(ex, axis=1), 1e-30)[:, None]
    else:
        s = tl.sigmoid(x)
        s = tl.where(cmask[None, :], s, 0.0)
    return s


@triton.jit
def _route_fwd_kernel(
    logits_ptr, bias_ptr, w_ptr, e_ptr, T, E, stride_l,
    K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    s = _scores(logits_ptr, rows, cols, T, E, stride_l, SOFTMAX)
    choose = s
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        choose = choose + b[None, :]
    choose = tl.where(cmask[None, :], choose, float("-inf"))
    wmat = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    emat = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    wsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in tl.static_range(K):
        idx = tl.argmax(choose, axis=1)
        sel = cols[None, :] == idx[:, None]
        wk = tl.sum(tl.where(sel, s, 0.0), axis=1)
        wsum += wk
        wmat = tl.where(kcols[None, :] == k, wk[:, None], wmat)
        emat = tl.where(kcols[None, :] == k, idx[:, None].to(tl.int64), emat)
        choose = tl.where(sel, float("-inf"), choose)
    if RENORM:
        wmat = wmat / tl.maximum(wsum, 1e-20)[:, None]
    omask = rmask[:, None] & (kcols[None, :] < K)
    optr = rows[:, None].to(tl.int64) * K + kcols[None, :]
    tl.store(w_ptr + optr, wmat, mask=omask)
    tl.store(e_ptr + optr, emat, mask=omask)


@triton.jit
def _route_bwd_kernel(
    logits_ptr, w_ptr, e_ptr, dw_ptr, dl_ptr, T, E, stride_l,
    K: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    s = _scores(logits_ptr, rows, cols, T, E, stride_l, SOFTMAX)
    kmask = rmask[:, None] & (kcols[None, :] < K)
    optr = rows[:, None].to(tl.int64) * K + kcols[None, :]
    g = tl.load(dw_ptr + optr, mask=kmask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + optr, mask=kmask, other=-1)
    if RENORM:
        w = tl.load(w_ptr + optr, mask=kmask, other=0.0)
        gw = tl.sum(g * w, axis=1)
    ssum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    ds = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k in tl.static_range(K):
        ek = tl.sum(tl.where(kcols[None, :] == k, e, 0), axis=1)
        gk = tl.sum(tl.where(kcols[None, :] == k, g, 0.0), axis=1)
        sel = cols[None, :] == ek[:, None]
        ssum += tl.sum(tl.where(sel, s, 0.0), axis=1)
        ds += tl.where(sel, gk[:, None], 0.0)
    if RENORM:
        # w_k = s_k / S  =>  dL/ds_k = (g_k - sum_j g_j w_j) / S for the chosen experts
        chosen = ds != 0.0
        for k in tl.static_range(K):
            ek = tl.sum(tl.where(kcols[None, :] == k, e, 0), axis=1)
            chosen = chosen | (cols[None, :] == ek[:, None])
        ds = tl.where(chosen, (ds - gw[:, None]) / tl.maximum(ssum, 1e-20)[:, None], 0.0)
    if SOFTMAX:
        dl = s * (ds - tl.sum(ds * s, axis=1)[:, None])
    else:
        dl = ds * s * (1.0 - s)
    tl.store(
        dl_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
        dl.to(dl_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


def _route_block(T: int, BLOCK_E: int) -> tuple[int, int]:
    """Rows per program and warps: no more rows than there are tokens (decode: T = 1..8 took
    13-25 us with 32 rows of one program, ncu/bench on the H200), fewer warps for small tiles
    (the k argmax rounds then reduce within a warp, without block-wide barriers)."""
    bt = max(1, min(64, 4096 // BLOCK_E, triton.next_power_of_2(max(T, 1))))
    return bt, max(1, min(4, bt * BLOCK_E // 256))


def route_fwd(logits_TE, top_k, score_func, bias_E, renormalize):
    T, E = logits_TE.shape
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown score_func {score_func!r}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")
    logits = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    w = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    ex = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    if T == 0:
        return w, ex
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T, warps = _route_block(T, BLOCK_E)
    bias = bias_E.contiguous() if bias_E is not None else logits
    _route_fwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits, bias, w, ex, T, E, logits.stride(0),
        K=top_k, SOFTMAX=score_func == "softmax", HAS_BIAS=bias_E is not None,
        RENORM=bool(renormalize and top_k > 1),
        BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(top_k), num_warps=warps,
    )  # fmt: skip
    return w, ex


def route_bwd(logits_TE, weights_TK, experts_TK, dweights_TK, score_func, renormalize):
    T, E = logits_TE.shape
    K = experts_TK.shape[1]
    logits = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    dl = torch.empty((T, E), dtype=logits.dtype, device=logits.device)
    if T == 0:
        return dl
    BLOCK_E = triton.next_power_of_2(E)
    BLOCK_T, warps = _route_block(T, BLOCK_E)
    _route_bwd_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits, weights_TK.contiguous(), experts_TK.contiguous(), dweights_TK.contiguous(), dl,
        T, E, logits.stride(0),
        K=K, SOFTMAX=score_func == "softmax", RENORM=bool(renormalize and K > 1),
        BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=triton.next_power_of_2(K), num_warps=warps,
    )  # fmt: skip
    return dl


# --------------------------------------------------------------------------------------
# permutation


def permute_index(experts_TK, num_experts, pad_to=1, n_rows=None):
    """counts_E, offsets_E1 (int64), row_index_N, dest_A (assignment -> permuted row).

    With pad_to == 1 no host sync happens (N = T*K); otherwise N is read back once.
    """
    flat = experts_TK.reshape(-1).contiguous()
    NA = flat.numel()
    dev = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    sizes = counts if pad_to <= 1 else (counts + pad_to - 1) // pad_to * pad_to
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    offsets[1:] = sizes.cumsum(0)
    if n_rows is None:
        n_rows = NA if pad_to <= 1 else int(offsets[-1])
    row_index = torch.full((n_rows,), -1, dtype=torch.int64, device=dev)
    dest = torch.empty(NA, dtype=torch.int64, device=dev)
    if NA > 0:
        BLOCK = 1024 if NA > 512 else max(16, triton.next_power_of_2(NA))
        # one segment: no earlier segment's counts are read (any int tensor stands in for them)
        _dest_seg_kernel[(num_experts, 1)](flat, offsets, offsets, dest, row_index, NA, BLOCK * triton.cdiv(NA, BLOCK),
                                           BLOCK=BLOCK, BLOCK_E=16, BLOCK_S=16)  # fmt: skip
    return counts, offsets, row_index, dest


@triton.jit
def _gather_kernel(
    x_ptr, idx_ptr, s_ptr, out_ptr, y_ptr, dot_ptr, D, DIV, stride_x, stride_o, stride_y,
    HAS_S: tl.constexpr, DOT: tl.constexpr, ACC64: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[p] = s[a] * x[a // DIV] with a = idx[p] (zeros where a < 0); optionally dot[a] = <x[a//DIV], y[p]>."""
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    p = tl.program_id(0).to(tl.int64)
    a = tl.load(idx_ptr + p)
    valid = a >= 0
    t = tl.where(valid, a, 0) // DIV
    if HAS_S:
        sc = tl.load(s_ptr + tl.where(valid, a, 0)).to(ACC)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    vvec = (tl.zeros((BLOCK_D,), dtype=tl.int64) + a) >= 0
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cm = cols < D
        v = tl.load(x_ptr + t * stride_x + cols, mask=cm & vvec, other=0.0)
        if DOT:
            yv = tl.load(y_ptr + p * stride_y + cols, mask=cm & vvec, other=0.0)
            acc += v.to(ACC) * yv.to(ACC)
        if HAS_S:
            v = v.to(ACC) * sc
        tl.store(out_ptr + p * stride_o + cols, v.to(out_ptr.dtype.element_ty), mask=cm)
    if DOT:
        tot = tl.sum(acc, 0)
        if a >= 0:
            tl.store(dot_ptr + a, tot.to(dot_ptr.dtype.element_ty))


def gather_rows(x_TD, idx_N, div, scale=None, dot_with=None):
    N = idx_N.numel()
    D = x_TD.shape[1]
    out = torch.empty((N, D), dtype=x_TD.dtype, device=x_TD.device)
    dot = None
    if dot_with is not None:
        dt = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
        dot = torch.zeros(scale.numel() if scale is not None else N, dtype=dt, device=x_TD.device)
    if N == 0:
        return out, dot
    x = x_TD.contiguous()
    y = dot_with.contiguous() if dot_with is not None else out
    _gather_kernel[(N,)](
        x, idx_N, scale if scale is not None else x, out, y, dot if dot is not None else out,
        D, div, x.stride(0), out.stride(0), y.stride(0),
        HAS_S=scale is not None, DOT=dot_with is not None, ACC64=_acc64(x.dtype),
        BLOCK_D=min(1024, triton.next_power_of_2(D)),
    )  # fmt: skip
    return out, dot


@triton.jit
def _combine_kernel(
    y_ptr, y2_ptr, pos_ptr, s_ptr, out_ptr, D, stride_y, stride_o,
    K: tl.constexpr, HAS_S: tl.constexpr, HAS_Y2: tl.constexpr, ACC64: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[t] = sum_k s[t, k] * (y[pos[t*K + k]] (+ y2[...]))  (fp32 accumulation, deterministic)."""
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + t * K + k)
        v = tl.load(y_ptr + p * stride_y + cols, mask=cm, other=0.0).to(ACC)
        if HAS_Y2:
            v += tl.load(y2_ptr + p * stride_y + cols, mask=cm, other=0.0).to(ACC)
        if HAS_S:
            v = v * tl.load(s_ptr + t * K + k).to(ACC)
        acc += v
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cm)


def combine(y_ND, pos_A, T, K, scale_TK=None, out_dtype=None, y2_ND=None):
    """out[t] = sum_k s[t, k] * y[pos[t*K + k]]; with ``y2_ND`` the rows of y + y2 (one pass)."""
    D = y_ND.shape[1]
    out = torch.empty((T, D), dtype=out_dtype or y_ND.dtype, device=y_ND.device)
    if T == 0:
        return out
    y = y_ND if y_ND.stride(1) == 1 else y_ND.contiguous()
    y2 = None
    if y2_ND is not None:
        y, y2 = y_ND.contiguous(), y2_ND.contiguous()
    BLOCK_D = min(1024, triton.next_power_of_2(D))
    s = scale_TK.contiguous() if scale_TK is not None else y
    _combine_kernel[(T, triton.cdiv(D, BLOCK_D))](
        y, y2 if y2 is not None else y, pos_A, s, out, D, y.stride(0), out.stride(0), K=K,
        HAS_S=scale_TK is not None, HAS_Y2=y2 is not None, ACC64=_acc64(y.dtype), BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


def inverse_index(row_index_N, n_assign):
    """pos[a] = the permuted row holding assignment a (padding rows of row_index skipped; no sync)."""
    dev = row_index_N.device
    pos = torch.zeros(n_assign + 1, dtype=torch.int64, device=dev)
    where = torch.where(row_index_N >= 0, row_index_N, n_assign)
    pos.scatter_(0, where, torch.arange(row_index_N.numel(), device=dev))
    return pos[:n_assign]


# --------------------------------------------------------------------------------------
# tile map for grouped GEMMs


def block_m_for(n_rows: int, n_groups: int) -> int:
    avg = max(1, -(-n_rows // max(1, n_groups)))
    if INTERPRET:
        return 16
    return min(128, max(16, triton.next_power_of_2(avg)))


@triton.jit
def _tile_loop(o0, o1, ecols, em, tm_ptr, n_tiles, E, BM: tl.constexpr, BLOCK_T: tl.constexpr, pid, NPROG: tl.constexpr):
    """Write the tile map for groups [o0[e], o1[e]) held in registers (blocks of BLOCK_T tiles,
    program ``pid`` of ``NPROG`` taking every NPROG-th block)."""
    tiles = tl.where(em, (o1 - o0 + BM - 1) // BM, 0)
    cum = tl.cumsum(tiles, 0)
    for t0 in range(pid * BLOCK_T, n_tiles, NPROG * BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        le = (cum[None, :] <= t[:, None]) & em[None, :]
        e = tl.sum(le.to(tl.int32), axis=1)
        before = tl.sum(tl.where(le, tiles[None, :], 0), axis=1)
        sel = ecols[None, :] == e[:, None]
        s0 = tl.sum(tl.where(sel, o0[None, :], 0), axis=1)
        s1 = tl.sum(tl.where(sel, o1[None, :], 0), axis=1)
        valid = e < E
        start = tl.where(valid, s0 + (t - before) * BM, 0)
        end = tl.where(valid, s1, 0)
        ec = tl.minimum(e, E - 1)
        tmask = t < n_tiles
        tl.store(tm_ptr + t, ec.to(tl.int32), mask=tmask)
        tl.store(tm_ptr + n_tiles + t, start.to(tl.int32), mask=tmask)
        tl.store(tm_ptr + 2 * n_tiles + t, end.to(tl.int32), mask=tmask)


@triton.jit
def _tile_map_kernel(
    cnt_ptr, offs_ptr, tm_ptr, E, n_tiles, n_segs,
    FROM_COUNTS: tl.constexpr, BM: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, NPROG: tl.constexpr,
):  # fmt: skip
    """(counts -> offsets, written by program 0) or offsets read; then this program's blocks of the
    tile map. Counts: ``n_segs`` rows of BLOCK_E (per-segment counts, summed), or one row."""
    ecols = tl.arange(0, BLOCK_E)
    em = ecols < E
    if FROM_COUNTS:  # int32 arithmetic inside (row counts < 2**31)
        counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for sg in range(0, n_segs):
            counts += tl.load(cnt_ptr + sg * BLOCK_E + ecols, mask=em, other=0).to(tl.int32)
        o1 = tl.cumsum(counts, 0)
        o0 = o1 - counts
        first = (ecols * 0 + tl.program_id(0)) == 0  # program 0 writes the offsets
        tl.store(offs_ptr + 1 + ecols, o1.to(tl.int64), mask=em & first)
        tl.store(offs_ptr + ecols, o0.to(tl.int64), mask=(ecols == 0) & first)
    else:
        o0 = tl.load(offs_ptr + ecols, mask=em, other=0).to(tl.int32)
        o1 = tl.load(offs_ptr + ecols + 1, mask=em, other=0).to(tl.int32)
    _tile_loop(o0, o1, ecols, em, tm_ptr, n_tiles, E, BM, BLOCK_T, tl.program_id(0), NPROG)


@triton.jit
def _seg_counts_kernel(flat_ptr, seg_ptr, NA, SEG, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program s: assignments per expert among [s * SEG, (s + 1) * SEG) -> seg[s, :BLOCK_E] (int32)."""
    sg = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for i0 in range(0, SEG, BLOCK):  # SEG is a multiple of BLOCK
        ids = sg * SEG + i0 + tl.arange(0, BLOCK)
        ex = tl.load(flat_ptr + ids, mask=ids < NA, other=-1)
        acc += tl.sum((ex[:, None] == ecols[None, :]).to(tl.int32), axis=0)
    tl.store(seg_ptr + sg * BLOCK_E + ecols, acc)


@triton.jit
def _dest_seg_kernel(flat_ptr, offs_ptr, seg_ptr, dest_ptr, rowidx_ptr, NA, SEG,
                     BLOCK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """Program (e, s): the stable rank of each assignment to expert e in segment s -> its permuted
    row (the experts' earlier segments counted from ``seg``)."""
    e = tl.program_id(0)
    sg = tl.program_id(1)
    ss = tl.arange(0, BLOCK_S)
    before = tl.sum(tl.load(seg_ptr + ss * BLOCK_E + e, mask=ss < sg, other=0), 0)
    running = tl.load(offs_ptr + e) + before.to(tl.int64)
    for i0 in range(0, SEG, BLOCK):
        ids = sg * SEG + i0 + tl.arange(0, BLOCK)
        ex = tl.load(flat_ptr + ids, mask=ids < NA, other=-1)
        hit = ex == e
        d = running + tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(dest_ptr + ids, d, mask=hit)
        tl.store(rowidx_ptr + d, ids.to(tl.int64), mask=hit)
        running += tl.sum(hit.to(tl.int32), 0)


@triton.jit
def _plan_small_kernel(
    flat_ptr, counts_ptr, offs_ptr, rowidx_ptr, dest_ptr, tm_ptr, NA, E, n_tiles,
    BM: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Few assignments (decode): counts, offsets, stable destinations and tile map in one launch."""
    a = tl.arange(0, BLOCK_A)
    am = a < NA
    ex = tl.load(flat_ptr + a, mask=am, other=-1)
    ecols = tl.arange(0, BLOCK_E)
    em = ecols < E
    onehot = (ex[:, None] == ecols[None, :]) & am[:, None]
    counts = tl.sum(onehot.to(tl.int32), axis=0)
    o1 = tl.cumsum(counts, 0)
    o0 = o1 - counts
    tl.store(counts_ptr + ecols, counts.to(tl.int64), mask=em)
    tl.store(offs_ptr + 1 + ecols, o1.to(tl.int64), mask=em)
    tl.store(offs_ptr + ecols, o0.to(tl.int64), mask=ecols == 0)
    base = tl.sum(tl.where(onehot, o0[None, :], 0), axis=1)
    same = (ex[:, None] == ex[None, :]) & (a[None, :] < a[:, None]) & am[None, :]
    d = (base + tl.sum(same.to(tl.int32), axis=1)).to(tl.int64)
    tl.store(dest_ptr + a, d, mask=am)
    tl.store(rowidx_ptr + d, a.to(tl.int64), mask=am)
    _tile_loop(o0, o1, ecols, em, tm_ptr, n_tiles, E, BM, BLOCK_T, 0, 1)


def _n_tiles(n_rows: int, E: int, block_m: int) -> int:
    return n_rows // block_m + min(E, n_rows) + 1


def tile_map(offsets_E1, block_m: int, n_rows: int):
    """int32 (3, n_tiles): expert, row_start, row_end of each tile (spare tiles: start == end)."""
    E = offsets_E1.numel() - 1
    n_tiles = _n_tiles(n_rows, E, block_m)
    tm = torch.empty((3, n_tiles), dtype=torch.int32, device=offsets_E1.device)
    offs = offsets_E1.to(torch.int64).contiguous()
    _tile_map_kernel[(1,)](
        offs, offs, tm, E, n_tiles, 1, FROM_COUNTS=False, BM=block_m,
        BLOCK_E=max(16, triton.next_power_of_2(E)), BLOCK_T=64, NPROG=1,
    )  # fmt: skip
    return tm, n_tiles


def plan(experts_TK, num_experts: int, block_m: int):
    """Everything the fused experts need about the routing, without a host sync.

    Returns offsets_E1, row_index_N, dest_A (assignment -> permuted row), tile map, n_tiles.
    Few assignments: one launch; otherwise counts (scatter_add), one launch for offsets and
    the tile map, one for the destinations.
    """
    flat = experts_TK.reshape(-1).contiguous()
    NA, E, dev = flat.numel(), num_experts, flat.device
    n_tiles = _n_tiles(NA, E, block_m)
    offsets = torch.empty(E + 1, dtype=torch.int64, device=dev)
    row_index = torch.empty(NA, dtype=torch.int64, device=dev)
    dest = torch.empty(NA, dtype=torch.int64, device=dev)
    tm = torch.empty((3, n_tiles), dtype=torch.int32, device=dev)
    BLOCK_E = max(16, triton.next_power_of_2(E))
    if NA <= 128 and BLOCK_E <= 256:
        counts = torch.empty(E, dtype=torch.int64, device=dev)
        _plan_small_kernel[(1,)](
            flat, counts, offsets, row_index, dest, tm, NA, E, n_tiles,
            BM=block_m, BLOCK_A=max(16, triton.next_power_of_2(NA)), BLOCK_E=BLOCK_E, BLOCK_T=32,
        )  # fmt: skip
        return offsets, row_index, dest, tm, n_tiles
    # segments of the assignments: per-segment expert counts (one launch), the offsets and the tile map
    # from their sums (one launch, blocks of tiles over programs), then one program per (expert, segment)
    BLOCK = 1024 if NA > 512 else max(16, triton.next_power_of_2(NA))
    n_seg = max(1, min(64, NA // 2048))
    SEG = BLOCK * triton.cdiv(triton.cdiv(NA, n_seg), BLOCK)
    n_seg = triton.cdiv(NA, SEG)
    seg = torch.empty((n_seg, BLOCK_E), dtype=torch.int32, device=dev)
    _seg_counts_kernel[(n_seg,)](flat, seg, NA, SEG, BLOCK=max(16, min(BLOCK, 8192 // BLOCK_E)), BLOCK_E=BLOCK_E)
    nprog = min(64, triton.next_power_of_2(triton.cdiv(n_tiles, 64)))  # a power of two: few compiled variants
    _tile_map_kernel[(nprog,)](
        seg, offsets, tm, E, n_tiles, n_seg, FROM_COUNTS=True, BM=block_m, BLOCK_E=BLOCK_E, BLOCK_T=64, NPROG=nprog,
    )  # fmt: skip
    _dest_seg_kernel[(E, n_seg)](flat, offsets, seg, dest, row_index, NA, SEG, BLOCK=BLOCK, BLOCK_E=BLOCK_E,
                                 BLOCK_S=max(16, triton.next_power_of_2(n_seg)))  # fmt: skip
    return offsets, row_index, dest, tm, n_tiles


# --------------------------------------------------------------------------------------
# grouped GEMM kernels

@triton.jit
def _tile_rows(tm_ptr, idx_ptr, n_tiles, DIV, GATHER: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's tile (the grid's axis 1) of the tile map: (expert, start, end, rows, row mask, A's rows).
    A's rows: gathered through idx // DIV, else the rows themselves; a row past the tile's end reads a valid row
    (never stored)."""
    pid_t = tl.program_id(1)
    e = tl.load(tm_ptr + pid_t)
    start = tl.load(tm_ptr + n_tiles + pid_t)
    end = tl.load(tm_ptr + 2 * n_tiles + pid_t)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    if GATHER:
        arow = tl.load(idx_ptr + rows, mask=rmask, other=0) // DIV
    else:
        arow = tl.where(rmask, rows, 0).to(tl.int64)
    return e, start, end, rows, rmask, arow


_GMM_GPU = [
    dict(BLOCK_N=128, BLOCK_K=64, w=8, s=3),
    dict(BLOCK_N=64, BLOCK_K=64, w=4, s=4),
    dict(BLOCK_N=256, BLOCK_K=64, w=8, s=3),
    dict(BLOCK_N=32, BLOCK_K=128, w=4, s=4),  # decode: more programs streaming weights
]
_GMM_INT = dict(BLOCK_N=32, BLOCK_K=32)


@triton.autotune(configs=_configs(_GMM_GPU, _GMM_INT), key=["N", "Kd", "BLOCK_M", "DUAL", "GATHER"])
@triton.jit
def _gmm_kernel(
    a_ptr, a2_ptr, idx_ptr, b_ptr, b2_ptr, c_ptr, tm_ptr, n_tiles, N, Kd, DIV,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm,
    GATHER: tl.constexpr, DUAL: tl.constexpr, ACC64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[p] = A[row(p)] @ B[e] (+ A2[row(p)] @ B2[e]) for the rows p of each tile of expert e."""
    e, start, end, rows, rmask, arow = _tile_rows(tm_ptr, idx_ptr, n_tiles, DIV, GATHER, BLOCK_M)
    if start >= end:
        return
    e = e.to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_off = arow[:, None] * stride_am + ks[None, :] * stride_ak
    b_off = e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        kmask = (k0 + ks) < Kd
        a = tl.load(a_ptr + a_off, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if DUAL:
            a2 = tl.load(a2_ptr + a_off, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b2 = tl.load(b2_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a2, b2, acc, input_precision=PREC)
        a_off += BLOCK_K * stride_ak
        b_off += BLOCK_K * stride_bk
    c_off = rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _gmm_tma_hook(nargs):
    nargs["b_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]
    if not nargs["GATHER"]:
        nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]


_GMM_TMA_GPU = [
    dict(BLOCK_N=128, BLOCK_K=64, w=8, s=3),
    dict(BLOCK_N=128, BLOCK_K=64, w=8, s=4),
    dict(BLOCK_N=64, BLOCK_K=64, w=4, s=4),
    dict(BLOCK_N=256, BLOCK_K=64, w=8, s=3),
    dict(BLOCK_N=32, BLOCK_K=128, w=4, s=4),
]


@triton.autotune(configs=_configs_hook(_GMM_TMA_GPU, _GMM_INT, _gmm_tma_hook), key=["N", "Kd", "BLOCK_M", "GATHER"])
@triton.jit
def _gmm_tma_kernel(
    a_ptr, a_desc, idx_ptr, b_desc, c_ptr, tm_ptr, n_tiles, N, Kd, DIV, stride_am, stride_cm,
    GATHER: tl.constexpr, ACC64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``_gmm_kernel`` (one product) with the weight tile loaded by TMA from an (E*K, N) descriptor and,
    when A is not gathered, A's tile too (rows [start, start + BLOCK_M) of A: rows past the tile's end are
    computed and not stored). K past Kd: A is zero there (mask, or the descriptor's zero fill)."""
    e, start, end, rows, rmask, arow = _tile_rows(tm_ptr, idx_ptr, n_tiles, DIV, GATHER, BLOCK_M)
    if start >= end:
        return
    ks = tl.arange(0, BLOCK_K)
    a_off = arow[:, None] * stride_am + ks[None, :]
    n0 = tl.program_id(0) * BLOCK_N
    wrow = e * Kd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        if GATHER:
            a = tl.load(a_ptr + a_off, mask=((k0 + ks) < Kd)[None, :], other=0.0)
            a_off += BLOCK_K
        else:
            a = a_desc.load([start, k0])
        b = b_desc.load([wrow + k0, n0])
        acc = tl.dot(a, b, acc, input_precision=PREC)
    cols = n0 + tl.arange(0, BLOCK_N)
    c_off = rows[:, None].to(tl.int64) * stride_cm + cols[None, :]
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & (cols < N)[None, :])


def _a_tma_ok(a: torch.Tensor) -> bool:
    return a.stride(1) == 1 and (a.stride(0) * a.element_size()) % 16 == 0 and a.data_ptr() % 16 == 0


def gmm(a, b_EKN, tm, n_tiles, block_m, n_rows, idx=None, div=1, a2=None, b2=None, tma=None):
    """Grouped GEMM over a tile map. ``b_EKN`` may be any strided (E, K, N) view (transposes are free).

    a: (rows, K) (gathered through idx // div when idx is given); a2/b2: a second product added
    (same strides as a / b).
    """
    Kd, N = b_EKN.shape[1], b_EKN.shape[2]
    c = torch.empty((n_rows, N), dtype=a.dtype, device=a.device)
    if n_rows == 0:
        return c
    if Kd == 0:
        return c.zero_()
    assert a.stride(1) == 1 or a.shape[1] == 1
    if a2 is not None:
        assert a2.stride() == a.stride() and b2.stride() == b_EKN.stride()
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_tiles)
    if tma is None:
        tma = tma_mode()
    if tma and a2 is None and _tma_ok(a, b_EKN) and (idx is not None or _a_tma_ok(a)):
        a_desc = a if idx is not None else TensorDescriptor(a, list(a.shape), [a.stride(0), 1], [16, 16])
        _gmm_tma_kernel[grid](
            a, a_desc, idx if idx is not None else tm, _wdesc(b_EKN), c, tm, n_tiles, N, Kd, div, a.stride(0),
            c.stride(0), GATHER=idx is not None, ACC64=_acc64(a.dtype), PREC=_prec(a.dtype), BLOCK_M=block_m,
        )  # fmt: skip
        return c
    _gmm_kernel[grid](
        a, a2 if a2 is not None else a, idx if idx is not None else tm, b_EKN,
        b2 if b2 is not None else b_EKN, c, tm, n_tiles, N, Kd, div,
        a.stride(0), a.stride(1), b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2), c.stride(0),
        GATHER=idx is not None, DUAL=a2 is not None, ACC64=_acc64(a.dtype), PREC=_prec(a.dtype),
        BLOCK_M=block_m,
    )  # fmt: skip
    return c


_GU_GPU = [
    dict(BLOCK_N=64, BLOCK_K=64, w=4, s=4),
    dict(BLOCK_N=128, BLOCK_K=64, w=8, s=3),
    dict(BLOCK_N=64, BLOCK_K=64, w=8, s=4),
    dict(BLOCK_N=32, BLOCK_K=128, w=4, s=4),  # decode: more programs streaming weights
    dict(BLOCK_N=128, BLOCK_K=64, w=8, s=4),  # prefill on Hopper: a deeper pipeline of the 128x(2x128) tile
    dict(BLOCK_N=64, BLOCK_K=128, w=8, s=3),
]


@triton.jit
def _gu_epilogue(acc_g, acc_u, g_ptr, u_ptr, h_ptr, o_off, omask, SAVE_GU: tl.constexpr):
    """Store H = silu(G) * U (and G, U for the backward) in the output dtype."""
    out_ty = h_ptr.dtype.element_ty
    if SAVE_GU:
        tl.store(g_ptr + o_off, acc_g.to(out_ty), mask=omask)
        tl.store(u_ptr + o_off, acc_u.to(out_ty), mask=omask)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + o_off, h.to(out_ty), mask=omask)


@triton.autotune(configs=_configs(_GU_GPU, _GMM_INT), key=["F", "D", "BLOCK_M", "GATHER"])
@triton.heuristics(dict(EVEN=lambda a: a["D"] % a["BLOCK_K"] == 0 and a["F"] % a["BLOCK_N"] == 0))
@triton.jit
def _gmm_gu_kernel(
    x_ptr, idx_ptr, wg_ptr, wu_ptr, g_ptr, u_ptr, h_ptr, tm_ptr, n_tiles, F, D, DIV,
    stride_xm, stride_we, stride_wk, stride_wn, stride_om,
    GATHER: tl.constexpr, SAVE_GU: tl.constexpr, ACC64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """H = silu(X[row] @ Wg[e]) * (X[row] @ Wu[e]); the gather of X rows and SwiGLU fused."""
    e, start, end, rows, rmask, arow = _tile_rows(tm_ptr, idx_ptr, n_tiles, DIV, GATHER, BLOCK_M)
    if start >= end:
        return
    e = e.to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_off = arow[:, None] * stride_xm + ks[None, :]
    b_off = e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN:  # no masks in the main loop: every row index is valid, D and F are whole tiles
            a = tl.load(x_ptr + a_off)
            bg = tl.load(wg_ptr + b_off)
            bu = tl.load(wu_ptr + b_off)
        else:
            kmask = (k0 + ks) < D
            a = tl.load(x_ptr + a_off, mask=rmask[:, None] & kmask[None, :], other=0.0)
            bg = tl.load(wg_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
            bu = tl.load(wu_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
        a_off += BLOCK_K
        b_off += BLOCK_K * stride_wk
    o_off = rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    _gu_epilogue(acc_g, acc_u, g_ptr, u_ptr, h_ptr, o_off, omask, SAVE_GU)


def _gu_tma_hook(nargs):
    bk, bn = nargs["BLOCK_K"], nargs["BLOCK_N"]
    nargs["wg_desc"].block_shape = [bk, bn]
    nargs["wu_desc"].block_shape = [bk, bn]


_GU_TMA_GPU = [
    dict(BLOCK_N=128, BLOCK_K=64, w=8, s=3),
    dict(BLOCK_N=128, BLOCK_K=64, w=8, s=4),
    dict(BLOCK_N=64, BLOCK_K=64, w=4, s=4),
    dict(BLOCK_N=64, BLOCK_K=128, w=8, s=3),
    dict(BLOCK_N=128, BLOCK_K=128, w=8, s=2),  # (BN=256 spills: 227 LDL / 355 STL in kernels.sass_report)
    dict(BLOCK_N=32, BLOCK_K=128, w=4, s=4),
]


@triton.autotune(configs=_configs_hook(_GU_TMA_GPU, _GMM_INT, _gu_tma_hook), key=["F", "D", "BLOCK_M", "GATHER"])
@triton.heuristics(dict(EVEN_D=lambda a: a["D"] % a["BLOCK_K"] == 0))
@triton.jit
def _gmm_gu_tma_kernel(
    x_ptr, idx_ptr, wg_desc, wu_desc, g_ptr, u_ptr, h_ptr, tm_ptr, n_tiles, F, D, DIV, stride_xm, stride_om,
    GATHER: tl.constexpr, SAVE_GU: tl.constexpr, ACC64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """``_gmm_gu_kernel`` with the two weight tiles loaded by TMA from (E*D, F) descriptors: no weight
    address arithmetic or masks in registers. A tile's K rows past D (D not a multiple of BLOCK_K) meet
    zeros of X (masked), and the descriptor zero-fills past E*D rows and F columns."""
    e, start, end, rows, rmask, arow = _tile_rows(tm_ptr, idx_ptr, n_tiles, DIV, GATHER, BLOCK_M)
    if start >= end:
        return
    n0 = tl.program_id(0) * BLOCK_N
    ks = tl.arange(0, BLOCK_K)
    a_off = arow[:, None] * stride_xm + ks[None, :]
    wrow = e * D
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_D:  # rows past a tile's end read a valid row (never stored): no mask at all
            a = tl.load(x_ptr + a_off)
        else:
            a = tl.load(x_ptr + a_off, mask=((k0 + ks) < D)[None, :], other=0.0)
        bg = wg_desc.load([wrow + k0, n0])
        bu = wu_desc.load([wrow + k0, n0])
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
        a_off += BLOCK_K
    cols = n0 + tl.arange(0, BLOCK_N)
    o_off = rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    omask = rmask[:, None] & (cols < F)[None, :]
    _gu_epilogue(acc_g, acc_u, g_ptr, u_ptr, h_ptr, o_off, omask, SAVE_GU)


def gmm_gu(x, wg_EDF, wu_EDF, tm, n_tiles, block_m, n_rows, idx=None, div=1, save_gu=True, tma=None):
    """H = silu(X[row] @ Wg[e]) * (X[row] @ Wu[e]) over the tile map; (G, U, H) (G, U are H when not saved).
    ``tma``: read the weights through TMA descriptors (None: ``MOECODER_TMA`` where the weights allow it)."""
    D, F = wg_EDF.shape[1], wg_EDF.shape[2]
    assert wg_EDF.stride() == wu_EDF.stride() and x.stride(1) == 1
    h = torch.empty((n_rows, F), dtype=x.dtype, device=x.device)
    g = torch.empty_like(h) if save_gu else h
    u = torch.empty_like(h) if save_gu else h
    if n_rows == 0:
        return g, u, h
    grid = lambda meta: (triton.cdiv(F, meta["BLOCK_N"]), n_tiles)
    if tma is None:
        tma = tma_mode()
    if tma and _tma_ok(x, wg_EDF) and _tma_ok(x, wu_EDF):
        _gmm_gu_tma_kernel[grid](
            x, idx if idx is not None else tm, _wdesc(wg_EDF), _wdesc(wu_EDF), g, u, h, tm, n_tiles, F, D, div,
            x.stride(0), h.stride(0), GATHER=idx is not None, SAVE_GU=save_gu, ACC64=_acc64(x.dtype),
            PREC=_prec(x.dtype), BLOCK_M=block_m,
        )  # fmt: skip
        return g, u, h
    _gmm_gu_kernel[grid](
        x, idx if idx is not None else tm, wg_EDF, wu_EDF, g, u, h, tm, n_tiles, F, D, div,
        x.stride(0), wg_EDF.stride(0), wg_EDF.stride(1), wg_EDF.stride(2), h.stride(0),
        GATHER=idx is not None, SAVE_GU=save_gu, ACC64=_acc64(x.dtype), PREC=_prec(x.dtype),
        BLOCK_M=block_m,
    )  # fmt: skip
    return g, u, h


_DH_GPU = [  # 8 warps: with 4 the epilogue spills (kernels/sass_report.py: ~500 local loads vs ~25)
    dict(BLOCK_K=128, w=8, s=3),
    dict(BLOCK_K=64, w=8, s=4),
    dict(BLOCK_K=64, w=8, s=3),
]
_DH_INT = dict(BLOCK_K=32)


@triton.autotune(configs=_configs(_DH_GPU, _DH_INT), key=["F", "D", "BLOCK_M", "BLOCK_N"])
@triton.jit
def _gmm_dh_kernel(
    dout_ptr, idx_ptr, sw_ptr, wd_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, dwp_ptr, hs_ptr, tm_ptr, n_tiles,
    F, D, DIV, stride_dm, stride_we, stride_wf, stride_wd, stride_gm, stride_dwp,
    WRITE_HS: tl.constexpr, ACC64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Backward of (down GEMM, routing weight, SwiGLU) for the rows of one tile.

    dHu = dout[row] @ Wd[e]^T (gather fused); dw partial = rowsum(dHu * H) per column block;
    dH = s * dHu; dG, dU from the SwiGLU derivative (H recomputed from the saved G, U).
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    e = tl.load(tm_ptr + pid_t).to(tl.int64)
    start = tl.load(tm_ptr + n_tiles + pid_t)
    end = tl.load(tm_ptr + 2 * n_tiles + pid_t)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    aidx = tl.load(idx_ptr + rows, mask=rmask, other=0)
    arow = aidx // DIV
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    a_off = arow[:, None] * stride_dm + ks[None, :]
    b_off = e * stride_we + ks[:, None] * stride_wd + cols[None, :] * stride_wf
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kmask = (k0 + ks) < D
        a = tl.load(dout_ptr + a_off, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(wd_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_off += BLOCK_K
        b_off += BLOCK_K * stride_wd
    o_off = rows[:, None].to(tl.int64) * stride_gm + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    g = tl.load(g_ptr + o_off, mask=omask, other=0.0).to(acc.dtype)
    u = tl.load(u_ptr + o_off, mask=omask, other=0.0).to(acc.dtype)
    sg = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sg
    h = silu * u
    part = tl.sum(acc * h, axis=1)
    tl.store(dwp_ptr + rows.to(tl.int64) * stride_dwp + pid_n, part.to(tl.float32), mask=rmask)
    s = tl.load(sw_ptr + aidx, mask=rmask, other=0.0).to(acc.dtype)
    dh = acc * s[:, None]
    du = dh * silu
    dg = dh * u * sg * (1.0 + g * (1.0 - sg))
    out_ty = dg_ptr.dtype.element_ty
    if WRITE_HS:  # s * H: the A operand of the down projection's weight gradient
        tl.store(hs_ptr + o_off, (h * s[:, None]).to(out_ty), mask=omask)
    tl.store(dg_ptr + o_off, dg.to(out_ty), mask=omask)
    tl.store(du_ptr + o_off, du.to(out_ty), mask=omask)


def gmm_dh(dout, idx, div, sw_flat, wd_EFD, g, u, tm, n_tiles, block_m, write_hs=False):
    """Returns dG, dU (N, F), dw_row (N,) float32 = <dout[t], Y[p]> per permuted row, and s*H or None."""
    n_rows, F = g.shape
    D = wd_EFD.shape[2]
    dg = torch.empty_like(g)
    du = torch.empty_like(u)
    block_n = 32 if INTERPRET else 64  # fixed (dwp has one column per block); 128 spilled in the epilogue
    nb = triton.cdiv(F, block_n)
    dwp = torch.zeros((n_rows, nb), dtype=torch.float32, device=g.device)
    hs = torch.empty_like(g) if write_hs else None
    if n_rows == 0:
        return dg, du, dwp.sum(1), hs
    _gmm_dh_kernel[(nb, n_tiles)](
        dout, idx, sw_flat, wd_EFD, g, u, dg, du, dwp, hs if write_hs else dg, tm, n_tiles, F, D, div,
        dout.stride(0), wd_EFD.stride(0), wd_EFD.stride(1), wd_EFD.stride(2), g.stride(0), dwp.stride(0),
        WRITE_HS=write_hs, ACC64=_acc64(g.dtype), PREC=_prec(g.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return dg, du, dwp.sum(1), hs


_DW_GPU = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, w=8, s=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, w=4, s=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, w=8, s=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, w=8, s=2),
]
_DW_INT = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16)


@triton.autotune(configs=_configs(_DW_GPU, _DW_INT), key=["M", "N", "A_MODE", "B_MODE", "HAS_BS", "DUAL", "A_T"])
@triton.jit
def _gmm_dw_kernel(
    a_ptr, aidx_ptr, u_ptr, b_ptr, b2_ptr, bidx_ptr, bs_ptr, c_ptr, c2_ptr, offs_ptr,
    M, N, DIVA, DIVB, stride_am, stride_bm, stride_ce, stride_cm,
    A_MODE: tl.constexpr, B_MODE: tl.constexpr, HAS_BS: tl.constexpr, DUAL: tl.constexpr, A_T: tl.constexpr,
    ACC64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[e] = A_e^T @ B_e over the rows of group e (an empty group gives zeros).

    A_MODE 0: A rows as stored; 1: A rows gathered (aidx[r] // DIVA); 2: A = silu(a) * u (SwiGLU
    recomputed from saved G, U). B_MODE 0: B rows as stored; 1: B rows gathered (bidx[r] // DIVB)
    and scaled by bs[bidx[r]]. DUAL: also C2[e] = A_e^T @ B2_e.
    """
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    nbn = tl.cdiv(N, BLOCK_N)
    pid_m = pid // nbn
    pid_n = pid % nbn
    start = tl.load(offs_ptr + e)
    end = tl.load(offs_ptr + e + 1)
    cm_ = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cn_ = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = cm_ < M
    nmask = cn_ < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for r0 in range(start, end, BLOCK_K):
        r = r0 + ks
        rm = r < end
        if A_MODE == 1:
            ar = tl.load(aidx_ptr + r, mask=rm, other=0) // DIVA
        else:
            ar = r.to(tl.int64)
        if A_T:  # A^T tile loaded directly as [BLOCK_M, BLOCK_K] by strides
            a_off = ar[None, :] * stride_am + cm_[:, None]
            a_mask = mmask[:, None] & rm[None, :]
        else:  # loaded as [BLOCK_K, BLOCK_M], transposed in registers below
            a_off = ar[:, None] * stride_am + cm_[None, :]
            a_mask = rm[:, None] & mmask[None, :]
        a = tl.load(a_ptr + a_off, mask=a_mask, other=0.0)
        if A_MODE == 2:
            uu = tl.load(u_ptr + a_off, mask=a_mask, other=0.0)
            AF: tl.constexpr = tl.float64 if ACC64 else tl.float32
            af = a.to(AF)
            a = (af / (1.0 + tl.exp(-af)) * uu.to(AF)).to(uu.dtype)
        if B_MODE == 1:
            bi = tl.load(bidx_ptr + r, mask=rm, other=0)
            br = bi // DIVB
        else:
            br = r.to(tl.int64)
        b_off = br[:, None] * stride_bm + cn_[None, :]
        b = tl.load(b_ptr + b_off, mask=rm[:, None] & nmask[None, :], other=0.0)
        if HAS_BS:
            sc = tl.load(bs_ptr + bi, mask=rm, other=0.0)
            SC: tl.constexpr = tl.float64 if ACC64 else tl.float32
            b = (b.to(SC) * sc[:, None].to(SC)).to(b.dtype)
        if not A_T:
            a = tl.trans(a)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        if DUAL:
            b2 = tl.load(b2_ptr + b_off, mask=rm[:, None] & nmask[None, :], other=0.0)
            acc2 = tl.dot(a, b2, acc2, input_precision=PREC)
    c_off = e * stride_ce + cm_[:, None].to(tl.int64) * stride_cm + cn_[None, :]
    omask = mmask[:, None] & nmask[None, :]
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=omask)
    if DUAL:
        tl.store(c2_ptr + c_off, acc2.to(c_ptr.dtype.element_ty), mask=omask)


def gmm_dw(
    a, b, offsets_E1, a_mode=0, aidx=None, diva=1, u=None, b_mode=0, bidx=None, divb=1, bscale=None, b2=None,
    a_t=True,
):  # fmt: skip
    """Per group e: A_e^T @ B_e -> (E, M, N) (and the same with b2 when given)."""
    E = offsets_E1.numel() - 1
    M, N = a.shape[1], b.shape[1]
    c = torch.empty((E, M, N), dtype=a.dtype, device=a.device)
    c2 = torch.empty_like(c) if b2 is not None else c
    if E == 0 or M == 0 or N == 0:
        return c, c2
    assert a.stride(1) == 1 and b.stride(1) == 1
    if u is not None:
        assert u.stride() == a.stride()
    if b2 is not None:
        assert b2.stride() == b.stride()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E)
    dummy = offsets_E1
    _gmm_dw_kernel[grid](
        a, aidx if aidx is not None else dummy, u if u is not None else a, b,
        b2 if b2 is not None else b, bidx if bidx is not None else dummy,
        bscale if bscale is not None else b, c, c2, offsets_E1,
        M, N, diva, divb, a.stride(0), b.stride(0), c.stride(0), c.stride(1),
        A_MODE=a_mode, B_MODE=b_mode, HAS_BS=bscale is not None, DUAL=b2 is not None, A_T=a_t, ACC64=_acc64(a.dtype), PREC=_prec(a.dtype),
    )  # fmt: skip
    return c, c2


# --------------------------------------------------------------------------------------
# SwiGLU (elementwise)


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0)
    u = tl.load(u_ptr + i, mask=m, other=0.0)
    gf = g.to(tl.float32) if g.dtype != tl.float64 else g
    h = gf / (1.0 + tl.exp(-gf)) * u.to(gf.dtype)
    tl.store(h_ptr + i, h.to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0)
    gf = g.to(tl.float32) if g.dtype != tl.float64 else g
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(gf.dtype)
    dh = tl.load(dh_ptr + i, mask=m, other=0.0).to(gf.dtype)
    sg = 1.0 / (1.0 + tl.exp(-gf))
    du = dh * gf * sg
    dg = dh * u * sg * (1.0 + gf * (1.0 - sg))
    tl.store(dg_ptr + i, dg.to(dg_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + i, du.to(du_ptr.dtype.element_ty), mask=m)


def swiglu_fwd(g, u):
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, 1024),)](g, u, h, n, BLOCK=1024)
    return h


def swiglu_bwd(g, u, dh):
    g, u, dh = g.contiguous(), u.contiguous(), dh.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, 1024),)](g, u, dh, dg, du, n, BLOCK=1024)
    return dg, du


# --------------------------------------------------------------------------------------
# decode: few tokens, no autograd. ONE launch for the routed experts and the combine.
#
# At T = 1..8 the layer is a handful of GEMVs that stream expert weights: what costs is the
# number of dependent launches (each ~1-1.4 us in a CUDA graph, plus its ramp and tail) and
# bytes in flight per SM. Program (column block f of F, assignment a = t*K + k) streams the
# three weight slices that column block touches: Wg[e][:, f] and Wu[e][:, f] (D x BLOCK_N
# each) give h = s_a * silu(x_t Wg) * (x_t Wu) for those columns, and Wd[e][f, :] (BLOCK_N x D)
# turns them into a partial down projection of token t, added in fp32 into a per-token
# accumulator with atomics (split-K over F and the sum over k in one). Every program moves
# the same 3 * D * BLOCK_N weights, K * F / BLOCK_N of them per token (384 for Qwen3-30B-A3B at
# T = 1 with BLOCK_N = 16), so the work spreads evenly over the SMs. The program that arrives
# last for token t (an int32 counter; release/acquire ordering) reads the accumulator, writes
# the output row in the input dtype and zeroes the accumulator and the counter again: the
# workspace is clean after every launch and is kept per device (no memset launch, CUDA-graph
# safe on one stream at a time). No permutation, no tile map, no separate combine launch.
# The fp32 sum over the K * F / BLOCK_N partials is in arrival order: not bit-reproducible
# from run to run (~1 fp32 ulp per add before the cast to bf16).
#
# Measured (H200, issue #18, docs/kernels-notes.md): correct, but 46.8 us at T=1 for Qwen3-30B-
# A3B (1.6 TB/s) where the four tiles-path launches take 31.7 us, so "auto" does not pick it
# (``kernels.autograd.DECODE_MAX_TOKENS``). Likely causes, not isolated: plain loads with one
# tile of prefetch keep too few bytes in flight per SM (the tiles kernels pipeline with cp.async),
# and every program adds a whole D-row into the same token row (192-768 atomic adds per address).

_DEC_GPU = [
    dict(BLOCK_N=16, BLOCK_K=256, BLOCK_D=256, w=4, s=1),
    dict(BLOCK_N=8, BLOCK_K=256, BLOCK_D=512, w=4, s=1),
    dict(BLOCK_N=32, BLOCK_K=128, BLOCK_D=256, w=4, s=1),
    dict(BLOCK_N=32, BLOCK_K=256, BLOCK_D=256, w=8, s=1),
    dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=128, w=4, s=1),
]
_DEC_INT = dict(BLOCK_N=16, BLOCK_K=16, BLOCK_D=16)


@triton.autotune(configs=_configs(_DEC_GPU, _DEC_INT), key=["F", "D", "NA"])
@triton.jit
def _decode_moe_kernel(
    x_ptr, e_ptr, s_ptr, wg_ptr, wu_ptr, wd_ptr, acc_ptr, cnt_ptr, out_ptr, F, D, NA, KT,
    stride_xm, stride_we, stride_wk, stride_wn, stride_de, stride_df, stride_dd, stride_om,
    ACC64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out[t] = sum over k and column blocks f of s[t,k] * swiglu(x[t] @ W{g,u}[e][:, f]) @ Wd[e][f, :]."""
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    pid_n = tl.program_id(0)
    a = tl.program_id(1).to(tl.int64)
    t = a // KT
    e = tl.load(e_ptr + a).to(tl.int64)
    sc = tl.load(s_ptr + a).to(ACC)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < F
    # gate/up GEMV over D, software-pipelined by hand (the next tiles load during this FMA)
    ks = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
    acc_u = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC)
    w_off = e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    m = (ks < D)[:, None] & cm[None, :]
    g = tl.load(wg_ptr + w_off, mask=m, other=0.0)
    u = tl.load(wu_ptr + w_off, mask=m, other=0.0)
    for k0 in range(0, D, BLOCK_K):
        xv = tl.load(x_ptr + t * stride_xm + k0 + ks, mask=(k0 + ks) < D, other=0.0).to(ACC)
        w_off += BLOCK_K * stride_wk
        mn = ((k0 + BLOCK_K + ks) < D)[:, None] & cm[None, :]
        g_next = tl.load(wg_ptr + w_off, mask=mn, other=0.0)
        u_next = tl.load(wu_ptr + w_off, mask=mn, other=0.0)
        acc_g += xv[:, None] * g.to(ACC)
        acc_u += xv[:, None] * u.to(ACC)
        g, u = g_next, u_next
    # the first down tile is in flight while SwiGLU is computed
    ds = tl.arange(0, BLOCK_D)
    d_base = wd_ptr + e * stride_de + cols[:, None].to(tl.int64) * stride_df
    wd = tl.load(d_base + ds[None, :] * stride_dd, mask=cm[:, None] & (ds < D)[None, :], other=0.0)
    sg = tl.sum(acc_g, axis=0)
    su = tl.sum(acc_u, axis=0)
    h = sg / (1.0 + tl.exp(-sg)) * su * sc  # zero in masked columns (sg = su = 0 there)
    # partial down projection of this column block, into the token's fp32 accumulator
    acc_row = acc_ptr + t * D
    n_d = tl.cdiv(D, BLOCK_D)
    for i in range(0, n_d - 1):
        d0 = i * BLOCK_D
        dn = d0 + BLOCK_D + ds
        wd_next = tl.load(d_base + dn[None, :] * stride_dd, mask=cm[:, None] & (dn < D)[None, :], other=0.0)
        part = tl.sum(h[:, None] * wd.to(ACC), axis=0)
        tl.atomic_add(acc_row + d0 + ds, part, sem="relaxed")
        wd = wd_next
    d0 = (n_d - 1) * BLOCK_D
    part = tl.sum(h[:, None] * wd.to(ACC), axis=0)
    # the last adds carry release semantics: this thread's earlier adds are ordered before them
    tl.atomic_add(acc_row + d0 + ds, part, mask=(d0 + ds) < D, sem="release")
    if D % BLOCK_D != 0:  # threads with no column in the ragged last chunk: order their adds too
        tl.atomic_add(acc_row + ds, tl.zeros((BLOCK_D,), dtype=ACC), mask=ds < D, sem="release")
    tl.debug_barrier()  # every thread's adds done before the counter moves
    n_prog = KT * tl.num_programs(0)
    arrived = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel")
    if arrived == n_prog - 1:  # last program of token t: cast out, clean the workspace
        for c0 in range(0, D, BLOCK_D):
            cc = c0 + ds
            v = tl.load(acc_row + cc, mask=cc < D, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + t * stride_om + cc, v.to(out_ptr.dtype.element_ty), mask=cc < D)
            tl.store(acc_row + cc, tl.zeros((BLOCK_D,), dtype=ACC), mask=cc < D)
        tl.store(cnt_ptr + t, 0)


_DEC_WS: dict = {}


def _decode_workspace(device, T: int, D: int, acc_dtype):
    """Per-device zeroed fp32 (fp64) accumulator and int32 counters, left clean by every launch."""
    key = (str(device), acc_dtype)
    ws = _DEC_WS.get(key)
    if ws is None or ws[0].numel() < T * D or ws[1].numel() < T:
        n_t = max(T, ws[1].numel() if ws is not None else 0)
        n_acc = max(T * D, ws[0].numel() if ws is not None else 0)
        ws = (torch.zeros(n_acc, dtype=acc_dtype, device=device), torch.zeros(n_t, dtype=torch.int32, device=device))
        _DEC_WS[key] = ws
    return ws


def decode_experts(x_TD, weights_TK, experts_TK, wg_EDF, wu_EDF, wd_EFD):
    """The routed experts' forward and the combine for a few tokens in ONE launch (no autograd, no sync).

    Not for two streams at once on one device (they would share the workspace).
    """
    T, K = experts_TK.shape
    D, F = wg_EDF.shape[1], wg_EDF.shape[2]
    assert wg_EDF.stride() == wu_EDF.stride() and x_TD.stride(1) == 1
    out = torch.empty((T, D), dtype=x_TD.dtype, device=x_TD.device)
    if T == 0:
        return out
    N = T * K
    e = experts_TK.contiguous()
    s = weights_TK.contiguous()
    acc64 = _acc64(x_TD.dtype)
    acc, cnt = _decode_workspace(x_TD.device, T, D, torch.float64 if acc64 else torch.float32)
    _decode_moe_kernel[lambda meta: (triton.cdiv(F, meta["BLOCK_N"]), N)](
        x_TD, e, s, wg_EDF, wu_EDF, wd_EFD, acc, cnt, out, F, D, N, K,
        x_TD.stride(0), wg_EDF.stride(0), wg_EDF.stride(1), wg_EDF.stride(2),
        wd_EFD.stride(0), wd_EFD.stride(1), wd_EFD.stride(2), out.stride(0), ACC64=acc64,
    )  # fmt: skip
    return out


def grouped_at_b(a_NM, b_NP, offsets_E1):
    """Per group e (rows offsets[e]:offsets[e+1]): A_e^T @ B_e -> (E, M, P); empty groups give zeros.

    bf16 CUDA tensors go to ``torch._grouped_mm`` (CUTLASS grouped GEMM, K-grouped);
    anything else (float64, CPU tests) to a loop over the groups with the same result.
    """
    E = offsets_E1.numel() - 1
    if a_NM.is_cuda and a_NM.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(a_NM.t(), b_NP, offs=offsets_E1[1:].to(torch.int32))
    out = a_NM.new_zeros((E, a_NM.shape[1], b_NP.shape[1]))
    offs = offsets_E1.tolist()
    for e in range(E):
        if offs[e + 1] > offs[e]:
            out[e] = a_NM[offs[e] : offs[e + 1]].t() @ b_NP[offs[e] : offs[e + 1]]
    return out


def grouped_mm_rows(a_NK, b_EKP, offsets_E1):
    """Row group e of A times B[e] -> (N, P) (every row in some group: offsets[-1] == N).

    bf16 CUDA tensors go to ``torch._grouped_mm`` (B may be a transposed view); anything else
    to a loop over the groups (CPU tests, float64).
    """
    if a_NK.is_cuda and a_NK.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(a_NK, b_EKP, offs=offsets_E1[1:].to(torch.int32))
    out = a_NK.new_zeros((a_NK.shape[0], b_EKP.shape[2]))
    offs = offsets_E1.tolist()
    for e in range(b_EKP.shape[0]):
        if offs[e + 1] > offs[e]:
            out[offs[e] : offs[e + 1]] = a_NK[offs[e] : offs[e + 1]] @ b_EKP[e]
    return out



@triton.jit
def _dh_epilogue_kernel(
    dhu_ptr, g_ptr, u_ptr, idx_ptr, sw_ptr, dg_ptr, du_ptr, hs_ptr, dwr_ptr, N, F, stride,
    WRITE_HS: tl.constexpr, ACC64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """The dH GEMM's epilogue as its own pass (when the GEMM is the library's): per permuted row
    p with routing weight s: dw_row[p] = <dHu[p], H[p]>, dH = s * dHu, SwiGLU derivative -> dG, dU,
    and s * H for the down projection's weight gradient (H recomputed from the saved G, U)."""
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = rows < N
    a = tl.load(idx_ptr + rows, mask=rm, other=0)
    s = tl.load(sw_ptr + a, mask=rm, other=0.0).to(ACC)
    part = tl.zeros((BLOCK_R,), dtype=ACC)
    out_ty = dg_ptr.dtype.element_ty
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        m = rm[:, None] & (cols < F)[None, :]
        off = rows[:, None].to(tl.int64) * stride + cols[None, :]
        acc = tl.load(dhu_ptr + off, mask=m, other=0.0).to(ACC)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
        u = tl.load(u_ptr + off, mask=m, other=0.0).to(ACC)
        sg = 1.0 / (1.0 + tl.exp(-g))
        silu = g * sg
        h = silu * u
        part += tl.sum(acc * h, axis=1)
        dh = acc * s[:, None]
        tl.store(du_ptr + off, (dh * silu).to(out_ty), mask=m)
        tl.store(dg_ptr + off, (dh * u * sg * (1.0 + g * (1.0 - sg))).to(out_ty), mask=m)
        if WRITE_HS:
            tl.store(hs_ptr + off, (h * s[:, None]).to(out_ty), mask=m)
    tl.store(dwr_ptr + rows, part.to(dwr_ptr.dtype.element_ty), mask=rm)


def dh_epilogue(dhu, g, u, idx, sw_flat, write_hs=False):
    """dG, dU, dw_row (N,), s*H or None from dHu = dout[token] @ Wd[e]^T and the saved G, U."""
    N, F = g.shape
    assert dhu.shape == g.shape and dhu.stride() == g.stride() == u.stride()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    hs = torch.empty_like(g) if write_hs else None
    dwr = torch.empty(N, dtype=torch.float64 if _acc64(g.dtype) else torch.float32, device=g.device)
    if N == 0:
        return dg, du, dwr, hs
    br, bf = (16, 16) if INTERPRET else (16, 256)
    _dh_epilogue_kernel[(triton.cdiv(N, br),)](
        dhu, g, u, idx, sw_flat, dg, du, hs if write_hs else dg, dwr, N, F, g.stride(0),
        WRITE_HS=write_hs, ACC64=_acc64(g.dtype), BLOCK_R=br, BLOCK_F=bf, num_warps=4,
    )  # fmt: skip
    return dg, du, dwr, hs
