"""The whole MoE layer for a few tokens (decode, T <= 16, no autograd) in three launches.

Issue #18: at T = 1 the layer in separate ops costs ~8 dependent launches (torch router
cast + GEMV, route kernel, plan kernel, gate/up, down, combine; the shared experts in torch:
~5 more), and the launches outside the two weight-streaming kernels took as long as those
two (docs/kernels-notes.md). Here:

1. ``router``: the fp32 router GEMV spread over E / BLOCK_ER programs (each one expert row
   for all tokens), the logits added into a zeroed per-device workspace; the program that
   arrives last (an int32 counter, release/acquire ordering as in ``decode_experts``) does
   the scoring (softmax, or sigmoid + selection bias), group-limited masking where
   configured, top-k, renormalisation and the routed scaling, then the plan of the tiles
   path (counts, offsets, stable permuted rows, tile map; ``_plan_small_kernel``'s math),
   and leaves the workspace and counter clean.
2. ``gate/up``: the tiles path's gate/up + SwiGLU GEMM over the tile map (the token gather
   fused), with the shared experts as extra tiles after the routed ones (rows = the tokens,
   no gather, their own weights and width): one launch streams all gate/up weights.
3. ``down + combine``: the down GEMM over the same tiles, each tile's rows scaled by their
   routing weight (1 for the shared experts) and added in fp32 with atomics into a per-token
   accumulator row; the last program of each column block (a counter per block) casts that
   block of every token's row out and zeroes it: no separate combine, no shared-output add.

Measured on the H200 (issue #18, docs/benchmarks.md, 2026-12-05): the whole layer at T=1 in
39.5 us (Qwen3-30B-A3B, 46% of the HBM floor) and 55.1 us (DeepSeek-V2-Lite, 59%) against 45.7
and 75.6 us for the separate ops in the same run; T=8 147 / 183 us (79% / 85%) against 163 / 225.

The fp32 sums of the combine are in arrival order (K + shared-tile adds per element; not
bit-reproducible run to run, ~1 fp32 ulp each before the cast). One stream at a time per
device (the workspace is shared). Launchers take and return torch tensors; under
``TRITON_INTERPRET=1`` they run on CPU tensors (float64 in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_ops import INTERPRET, _acc64, _configs, _n_tiles, _prec, _tile_loop

try:  # grid dependency control (programmatic dependent launch, sm_90+): Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_wait = gdc_launch_dependents = None

MAX_TOKENS = 16  # the router's last program holds T x E scores and T*K x E one-hots in registers


# --------------------------------------------------------------------------------------
# launch 1: router GEMV + scoring + top-k + plan


@triton.jit
def _router_kernel(
    x_ptr, wr_ptr, bias_ptr, lg_ptr, cnt_ptr, w_ptr, e_ptr, rowidx_ptr, tm_ptr, sg_ptr, su_ptr, hs_ptr,
    T, E, D, FS, stride_x, stride_wr, stride_sk, stride_sn, stride_hs, scaling, n_tiles, n_router,
    K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_ER: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, BM: tl.constexpr, BLOCK_TT: tl.constexpr,
    SHARED: tl.constexpr, PREC: tl.constexpr, SBN: tl.constexpr, SBK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Programs < n_router: router rows, the last of them routes and plans. With SHARED, the
    programs after them compute the shared experts' gate/up + SwiGLU (independent of the routing)."""
    if PDL:  # launched early (programmatic dependent launch): x is the previous kernel's output
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    if pid < n_router:
        _router_part(x_ptr, wr_ptr, bias_ptr, lg_ptr, cnt_ptr, w_ptr, e_ptr, rowidx_ptr, tm_ptr,
                     T, E, D, stride_x, stride_wr, scaling, n_tiles, n_router, pid,
                     K, SOFTMAX, HAS_BIAS, RENORM, N_GROUPS, TOPK_GROUPS, GROUP_TOP2, ACC64,
                     BLOCK_T, BLOCK_ER, BLOCK_D, BLOCK_E, BLOCK_K, BLOCK_G, BM, BLOCK_TT)  # fmt: skip
    if SHARED:
        if pid >= n_router:
            j = pid - n_router
            nbs = tl.cdiv(FS, SBN)
            start = (j // nbs) * BM
            _gu_tile(x_ptr, rowidx_ptr, 1, sg_ptr, su_ptr, stride_sk, stride_sn, hs_ptr, stride_hs, stride_x,
                     start, tl.minimum(start + BM, T), j % nbs, FS, D,
                     GATHER=False, ACC64=ACC64, PREC=PREC, BLOCK_M=BM, BLOCK_N=SBN, BLOCK_K=SBK)  # fmt: skip


@triton.jit
def _router_part(
    x_ptr, wr_ptr, bias_ptr, lg_ptr, cnt_ptr, w_ptr, e_ptr, rowidx_ptr, tm_ptr,
    T, E, D, stride_x, stride_wr, scaling, n_tiles, n_router, pid,
    K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr, ACC64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_ER: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, BM: tl.constexpr, BLOCK_TT: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    rows = tl.arange(0, BLOCK_T)
    rm = rows < T
    er = pid * BLOCK_ER + tl.arange(0, BLOCK_ER)
    erm = er < E
    acc = tl.zeros((BLOCK_T, BLOCK_ER), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < D
        xv = tl.load(x_ptr + rows[:, None] * stride_x + ds[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
        wv = tl.load(wr_ptr + er[:, None].to(tl.int64) * stride_wr + ds[None, :], mask=erm[:, None] & dm[None, :],
                     other=0.0)  # fmt: skip
        acc += tl.sum(xv.to(ACC)[:, None, :] * wv.to(ACC)[None, :, :], axis=2)
    # into the zeroed workspace (release: ordered before this program's arrival below)
    tl.atomic_add(lg_ptr + rows[:, None] * E + er[None, :], acc, mask=rm[:, None] & erm[None, :], sem="release")
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if arrived == n_router - 1:  # the last router program: routing and plan for all tokens
        cols = tl.arange(0, BLOCK_E)
        cm = cols < E
        lmask = rm[:, None] & cm[None, :]
        loff = rows[:, None] * E + cols[None, :]
        x = tl.load(lg_ptr + loff, mask=lmask, other=float("-inf"), cache_modifier=".cg").to(ACC)
        tl.store(lg_ptr + loff, tl.zeros((BLOCK_T, BLOCK_E), dtype=ACC), mask=lmask)
        tl.store(cnt_ptr, 0)
        if SOFTMAX:
            m = tl.max(x, axis=1)
            m = tl.where(m == float("-inf"), 0.0, m)
            ex = tl.where(cm[None, :], tl.exp(x - m[:, None]), 0.0)
            s = ex / tl.maximum(tl.sum(ex, axis=1), 1e-30)[:, None]
        else:
            s = tl.where(cm[None, :], 1.0 / (1.0 + tl.exp(-x)), 0.0)
        choose = s
        if HAS_BIAS:
            choose = choose + tl.load(bias_ptr + cols, mask=cm, other=0.0).to(ACC)[None, :]
        choose = tl.where(cm[None, :], choose, float("-inf"))
        if TOPK_GROUPS < N_GROUPS:  # group-limited: only experts of the best TOPK_GROUPS groups compete
            gid = cols // (E // N_GROUPS)
            gcols = tl.arange(0, BLOCK_G)
            gs = tl.full((BLOCK_T, BLOCK_G), float("-inf"), dtype=ACC)
            for g in tl.static_range(N_GROUPS):
                v = tl.where((gid == g)[None, :], choose, float("-inf"))
                best = tl.max(v, axis=1)
                if GROUP_TOP2:  # sum of the two best (biased) scores of the group
                    i1 = tl.argmax(v, axis=1)
                    best = best + tl.max(tl.where(cols[None, :] == i1[:, None], float("-inf"), v), axis=1)
                gs = tl.where(gcols[None, :] == g, best[:, None], gs)
            keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int32)
            for _r in tl.static_range(TOPK_GROUPS):
                gi = tl.argmax(gs, axis=1)
                keep = tl.where(gid[None, :] == gi[:, None], 1, keep)
                gs = tl.where(gcols[None, :] == gi[:, None], float("-inf"), gs)
            choose = tl.where(keep != 0, choose, float("-inf"))
        kcols = tl.arange(0, BLOCK_K)
        wmat = tl.zeros((BLOCK_T, BLOCK_K), dtype=ACC)
        emat = tl.full((BLOCK_T, BLOCK_K), -1, dtype=tl.int32)
        wsum = tl.zeros((BLOCK_T,), dtype=ACC)
        for k in tl.static_range(K):
            idx = tl.argmax(choose, axis=1)
            sel = cols[None, :] == idx[:, None]
            wk = tl.sum(tl.where(sel, s, 0.0), axis=1)
            wsum += wk
            wmat = tl.where(kcols[None, :] == k, wk[:, None], wmat)
            emat = tl.where(kcols[None, :] == k, idx[:, None].to(tl.int32), emat)
            choose = tl.where(sel, float("-inf"), choose)
        if RENORM:
            wmat = wmat / tl.maximum(wsum, 1e-20)[:, None]
        wmat = wmat * scaling
        amask = rm[:, None] & (kcols[None, :] < K)
        aid = rows[:, None] * K + kcols[None, :]
        tl.store(w_ptr + aid, wmat.to(w_ptr.dtype.element_ty), mask=amask)
        tl.store(e_ptr + aid, emat.to(tl.int64), mask=amask)
        # plan (as _plan_small_kernel): counts, offsets, stable permuted rows, tile map
        BLOCK_A: tl.constexpr = BLOCK_T * BLOCK_K
        fe = tl.reshape(tl.where(amask, emat, -1), (BLOCK_A,))
        fa = tl.reshape(aid, (BLOCK_A,))
        fm = fe >= 0
        onehot = (fe[:, None] == cols[None, :]) & fm[:, None]
        counts = tl.sum(onehot.to(tl.int32), axis=0)
        o1 = tl.cumsum(counts, 0)
        o0 = o1 - counts
        base = tl.sum(tl.where(onehot, o0[None, :], 0), axis=1)
        same = (fe[:, None] == fe[None, :]) & (fa[None, :] < fa[:, None]) & fm[None, :]
        dst = (base + tl.sum(same.to(tl.int32), axis=1)).to(tl.int64)
        tl.store(rowidx_ptr + dst, fa.to(tl.int64), mask=fm)
        _tile_loop(o0, o1, cols, cm, tm_ptr, n_tiles, E, BM, BLOCK_TT, 0, 1)


# --------------------------------------------------------------------------------------
# launches 2 and 3: tiles of routed experts, then the shared experts' tiles


@triton.jit
def _gu_tile(
    x_ptr, idx_ptr, DIV, wg_ptr, wu_ptr, stride_wk, stride_wn, h_ptr, stride_h, stride_x,
    start, end, pid_n, N, D,
    GATHER: tl.constexpr, ACC64: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h[rows] = silu(x[row] @ Wg[:, cols]) * (x[row] @ Wu[:, cols]) for rows start..end of one tile."""
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    if GATHER:
        arow = tl.load(idx_ptr + rows, mask=rmask, other=0) // DIV
    else:
        arow = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_off = arow[:, None] * stride_x + ks[None, :]
    b_off = ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kmask = (k0 + ks) < D
        a = tl.load(x_ptr + a_off, mask=rmask[:, None] & kmask[None, :], other=0.0)
        bg = tl.load(wg_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        bu = tl.load(wu_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PREC)
        a_off += BLOCK_K
        b_off += BLOCK_K * stride_wk
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    o_off = rows[:, None].to(tl.int64) * stride_h + cols[None, :]
    tl.store(h_ptr + o_off, h.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


_LAYER_GPU = [
    dict(BLOCK_N=32, BLOCK_K=128, w=4, s=4),  # first: decode (more programs streaming weights)
    dict(BLOCK_N=64, BLOCK_K=64, w=4, s=4),
    dict(BLOCK_N=64, BLOCK_K=128, w=4, s=3),
    dict(BLOCK_N=16, BLOCK_K=256, w=4, s=3),
    # T=1 streams 8 experts' gate/up: F / 32 x 8 = 192 programs at Qwen3's shape, 1.45 per SM;
    # deeper or wider K per program is the other way to keep more bytes in flight
    dict(BLOCK_N=32, BLOCK_K=256, w=4, s=3),
    dict(BLOCK_N=16, BLOCK_K=128, w=2, s=6),
]
_LAYER_INT = dict(BLOCK_N=16, BLOCK_K=16)


@triton.autotune(configs=_configs(_LAYER_GPU, _LAYER_INT), key=["F", "FS", "D", "T"])
@triton.jit
def _gu_kernel(
    x_ptr, rowidx_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, hs_ptr, tm_ptr, n_tiles, T, F, FS, D, K,
    stride_x, stride_we, stride_wk, stride_wn, stride_sk, stride_sn, stride_h, stride_hs,
    ACC64: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    if PDL:  # the tile map and rows are launch 1's output
        gdc_wait()
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    if pid_t < n_tiles:  # a routed tile: rows of one expert, tokens gathered
        e = tl.load(tm_ptr + pid_t).to(tl.int64)
        start = tl.load(tm_ptr + n_tiles + pid_t)
        end = tl.load(tm_ptr + 2 * n_tiles + pid_t)
        if (start < end) & (pid_n * BLOCK_N < F):
            _gu_tile(x_ptr, rowidx_ptr, K, wg_ptr + e * stride_we, wu_ptr + e * stride_we, stride_wk, stride_wn,
                     h_ptr, stride_h, stride_x, start, end, pid_n, F, D,
                     GATHER=True, ACC64=ACC64, PREC=PREC, BLOCK_M=BM, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)  # fmt: skip
    else:  # a shared-experts tile: the tokens themselves
        start = (pid_t - n_tiles) * BM
        if pid_n * BLOCK_N < FS:
            _gu_tile(x_ptr, rowidx_ptr, 1, sg_ptr, su_ptr, stride_sk, stride_sn, hs_ptr, stride_hs, stride_x,
                     start, tl.minimum(start + BM, T), pid_n, FS, D,
                     GATHER=False, ACC64=ACC64, PREC=PREC, BLOCK_M=BM, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)  # fmt: skip


@triton.jit
def _down_tile(
    h_ptr, stride_h, wd_ptr, stride_wf, stride_wd, rows, rmask, pid_n, D, Fk,
    ACC64: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    ks = tl.arange(0, BLOCK_K)
    a_off = rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    b_off = ks[:, None] * stride_wf + cols[None, :] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if ACC64 else tl.float32)
    for k0 in range(0, Fk, BLOCK_K):
        kmask = (k0 + ks) < Fk
        a = tl.load(h_ptr + a_off, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(wd_ptr + b_off, mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_off += BLOCK_K
        b_off += BLOCK_K * stride_wf
    return acc


@triton.autotune(configs=_configs(_LAYER_GPU, _LAYER_INT), key=["F", "FS", "D", "T"])
@triton.jit
def _down_kernel(
    h_ptr, hs_ptr, rowidx_ptr, w_ptr, wd_ptr, sd_ptr, acc_ptr, cnt_ptr, out_ptr, tm_ptr, n_tiles, T, F, FS, D, K,
    stride_h, stride_hs, stride_de, stride_df, stride_dd, stride_sf, stride_sd, stride_o,
    ACC64: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BLOCK_TO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = tl.float64 if ACC64 else tl.float32
    if PDL:  # h is launch 2's output
        gdc_wait()
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    if pid_t < n_tiles:  # routed: y = s * (h[p] @ Wd[e]) into token row[p] // K
        e = tl.load(tm_ptr + pid_t).to(tl.int64)
        start = tl.load(tm_ptr + n_tiles + pid_t)
        end = tl.load(tm_ptr + 2 * n_tiles + pid_t)
        if start < end:
            rows = start + tl.arange(0, BM)
            rmask = rows < end
            acc = _down_tile(h_ptr, stride_h, wd_ptr + e * stride_de, stride_df, stride_dd, rows, rmask, pid_n, D, F,
                             ACC64=ACC64, PREC=PREC, BLOCK_M=BM, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)  # fmt: skip
            a = tl.load(rowidx_ptr + rows, mask=rmask, other=0)
            sc = tl.load(w_ptr + a, mask=rmask, other=0.0).to(ACC)
            tok = a // K
            tl.atomic_add(acc_ptr + tok[:, None] * D + cols[None, :], acc * sc[:, None],
                          mask=rmask[:, None] & cmask[None, :], sem="release")  # fmt: skip
    else:  # shared experts: weight 1, rows are tokens
        rows = (pid_t - n_tiles) * BM + tl.arange(0, BM)
        rmask = rows < T
        acc = _down_tile(hs_ptr, stride_hs, sd_ptr, stride_sf, stride_sd, rows, rmask, pid_n, D, FS,
                         ACC64=ACC64, PREC=PREC, BLOCK_M=BM, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)  # fmt: skip
        tl.atomic_add(acc_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], acc,
                      mask=rmask[:, None] & cmask[None, :], sem="release")  # fmt: skip
    tl.debug_barrier()  # every thread's adds done before the counter moves
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
    if arrived == tl.num_programs(1) - 1:  # last program of this column block: cast out, clean up
        ts = tl.arange(0, BLOCK_TO)
        m = (ts < T)[:, None] & cmask[None, :]
        off = ts[:, None].to(tl.int64) * D + cols[None, :]
        v = tl.load(acc_ptr + off, mask=m, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + ts[:, None].to(tl.int64) * stride_o + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=m)
        tl.store(acc_ptr + off, tl.zeros((BLOCK_TO, BLOCK_N), dtype=ACC), mask=m)
        tl.store(cnt_ptr + pid_n, 0)


# --------------------------------------------------------------------------------------
# launchers

DEFAULT_PDL = "0"


def pdl_wanted(device) -> bool:
    """MOECODER_PDL=0|auto|1: launch the layer op's three kernels with programmatic dependent
    launch (each may start while the previous one drains; it waits in ``gdc_wait`` before reading
    that one's output). auto: on CUDA devices of compute capability >= 9 (Hopper). Default 0:
    measured on an H100 (2026-12-07, docs/kernels-notes.md) it did not shorten T=1 (Qwen3-30B-A3B
    shape 47 -> 49 us, DeepSeek-V2-Lite 67 -> 67 us); only DeepSeek at T=8 gained (253 -> 240 us)."""
    import os

    v = os.environ.get("MOECODER_PDL", DEFAULT_PDL).strip().lower() or DEFAULT_PDL
    if v not in ("auto", "1", "0"):
        raise ValueError(f"MOECODER_PDL must be one of auto, 1, 0; got {v!r}")
    dev = torch.device(device)
    if v == "0" or INTERPRET or gdc_wait is None or dev.type != "cuda":
        return False
    return v == "1" or torch.cuda.get_device_capability(dev)[0] >= 9


def _pdl(device) -> dict:
    """The launch arguments for PDL on ``device``: the kernels' flag, and Triton's launch option when on."""
    return dict(PDL=True, launch_pdl=True) if pdl_wanted(device) else dict(PDL=False)


_WS: dict = {}


def _workspace(device, acc_dtype, T: int, E: int, D: int):
    """Per-device zeroed accumulators (logits T x E, output T x D) and int32 counters, left clean by
    every launch. Sized for MAX_TOKENS so that a CUDA graph never sees it grow after warm-up."""
    key = (str(device), acc_dtype)
    n_lg, n_acc, n_cnt = MAX_TOKENS * max(E, 256), MAX_TOKENS * max(D, 8192), 1 + max(D, 8192)
    ws = _WS.get(key)
    if ws is None or ws[0].numel() < T * E or ws[1].numel() < T * D or ws[2].numel() < 1 + D:
        n_lg, n_acc, n_cnt = max(n_lg, T * E), max(n_acc, T * D), max(n_cnt, 1 + D)
        ws = (torch.zeros(n_lg, dtype=acc_dtype, device=device), torch.zeros(n_acc, dtype=acc_dtype, device=device),
              torch.zeros(n_cnt, dtype=torch.int32, device=device))  # fmt: skip
        _WS[key] = ws
    return ws


def _router_meta(T: int, E: int, D: int, K: int, n_groups: int, warps: int | None = None):
    """Launch 1's blocks and warps. ``warps=1`` (not the default; measured next, see
    docs/kernels-notes.md run 7): every reduction of the last program by warp shuffles, no block
    barriers; BLOCK_D shrinks so that the GEMV tile stays at 64 fp32 registers per thread
    (compiled for sm_90 without spills at T = 1, 2 and E = 64, 128: ``kernels.sass_report``)."""
    BLOCK_T = triton.next_power_of_2(max(T, 1))
    BLOCK_ER = 1  # one router row per program: E programs of D fp32 weights each (all loads at once)
    BLOCK_D = min(triton.next_power_of_2(D), max(256, 8192 // BLOCK_T))  # <= 2 iterations at D = 2048
    BLOCK_E = max(16, triton.next_power_of_2(E))
    BLOCK_K = triton.next_power_of_2(K)
    if warps is None:
        warps = 4 if BLOCK_T * BLOCK_K * BLOCK_E <= 16384 else 8
    elif warps == 1:
        BLOCK_D = min(triton.next_power_of_2(D), max(64, 2048 // BLOCK_T))
    return dict(BLOCK_T=BLOCK_T, BLOCK_ER=BLOCK_ER, BLOCK_D=BLOCK_D, BLOCK_E=BLOCK_E, BLOCK_K=BLOCK_K,
                BLOCK_G=triton.next_power_of_2(max(n_groups, 1)), BM=16, BLOCK_TT=32, num_warps=warps)  # fmt: skip


def route_plan(x_TD, router_w_ED, bias_E, top_k, score_func, renormalize, n_groups, topk_groups, group_score,
               routed_scaling, sg_DF=None, su_DF=None, num_warps=None):  # fmt: skip
    """Launch 1: (weights_TK fp32 with the routed scaling applied, experts_TK int64, row_index_N, tile map,
    n_tiles, h_TFs of the shared experts or None). With ``sg_DF``/``su_DF`` the shared experts' gate/up
    run in the same launch, on programs after the router's. ``num_warps`` overrides the default (4 or 8)."""
    T, D = x_TD.shape
    E = router_w_ED.shape[0]
    K = int(top_k)
    dev = x_TD.device
    acc64 = _acc64(x_TD.dtype)
    lg, _, cnt = _workspace(dev, torch.float64 if acc64 else torch.float32, T, E, D)
    NA = T * K
    n_tiles = _n_tiles(NA, E, 16)
    w = torch.empty((T, K), dtype=torch.float32, device=dev)
    ex = torch.empty((T, K), dtype=torch.int64, device=dev)
    rowidx = torch.empty(NA, dtype=torch.int64, device=dev)
    tm = torch.empty((3, n_tiles), dtype=torch.int32, device=dev)
    meta = _router_meta(T, E, D, K, n_groups, num_warps)
    wr = router_w_ED if router_w_ED.stride(1) == 1 else router_w_ED.contiguous()
    bias = bias_E.contiguous() if bias_E is not None else wr
    n_router = triton.cdiv(E, meta["BLOCK_ER"])
    FS = sg_DF.shape[1] if sg_DF is not None else 0
    sbn, sbk = (16, 16) if INTERPRET else (32, 128)
    hs = torch.empty((T, FS), dtype=x_TD.dtype, device=dev) if FS else None
    n_sh = triton.cdiv(T, 16) * triton.cdiv(FS, sbn) if FS else 0
    sg, su = (sg_DF, su_DF) if FS else (x_TD, x_TD)
    _router_kernel[(n_router + n_sh,)](
        x_TD, wr, bias, lg, cnt, w, ex, rowidx, tm, sg, su, hs if FS else x_TD,
        T, E, D, FS, x_TD.stride(0), wr.stride(0), sg.stride(0), sg.stride(1), hs.stride(0) if FS else 0,
        float(routed_scaling), n_tiles, n_router, K=K, SOFTMAX=score_func == "softmax", HAS_BIAS=bias_E is not None,
        RENORM=bool(renormalize and K > 1), N_GROUPS=int(n_groups), TOPK_GROUPS=int(topk_groups),
        GROUP_TOP2=group_score == "top2sum", ACC64=acc64, SHARED=bool(FS), PREC=_prec(x_TD.dtype),
        SBN=sbn, SBK=sbk, **meta, **_pdl(dev),
    )  # fmt: skip
    return w, ex, rowidx, tm, n_tiles, hs


def gate_up(x_TD, rowidx, tm, n_tiles, K, wg_EDF, wu_EDF, sg_DF=None, su_DF=None):
    """Launch 2: (h_NF of the routed rows in tile order, h_TFs of the shared experts or None)."""
    T, D = x_TD.shape
    F = wg_EDF.shape[2]
    FS = sg_DF.shape[1] if sg_DF is not None else 0
    h = torch.empty((T * K, F), dtype=x_TD.dtype, device=x_TD.device)
    hs = torch.empty((T, max(FS, 1)), dtype=x_TD.dtype, device=x_TD.device)
    n_sh = triton.cdiv(T, 16) if FS else 0
    sg, su = (sg_DF, su_DF) if FS else (wg_EDF[0], wu_EDF[0])
    grid = lambda meta: (triton.cdiv(max(F, FS), meta["BLOCK_N"]), n_tiles + n_sh)
    _gu_kernel[grid](
        x_TD, rowidx, wg_EDF, wu_EDF, sg, su, h, hs, tm, n_tiles, T, F, FS, D, K,
        x_TD.stride(0), wg_EDF.stride(0), wg_EDF.stride(1), wg_EDF.stride(2), sg.stride(0), sg.stride(1),
        h.stride(0), hs.stride(0), ACC64=_acc64(x_TD.dtype), PREC=_prec(x_TD.dtype), BM=16, **_pdl(x_TD.device),
    )  # fmt: skip
    return h, (hs if FS else None)


def down_combine(h, hs, rowidx, weights_TK, tm, n_tiles, T, K, wd_EFD, sd_FD=None, out_dtype=None):
    """Launch 3: out[t] = sum_k w[t, k] * (h @ Wd[e]) (+ hs[t] @ Wsd), fp32 sums, cast to ``out_dtype``."""
    E, F, D = wd_EFD.shape
    FS = sd_FD.shape[0] if (sd_FD is not None and hs is not None) else 0
    dev = h.device
    acc64 = _acc64(h.dtype)
    _, acc, cnt = _workspace(dev, torch.float64 if acc64 else torch.float32, T, E, D)
    out = torch.empty((T, D), dtype=out_dtype or h.dtype, device=dev)
    n_sh = triton.cdiv(T, 16) if FS else 0
    sd = sd_FD if FS else wd_EFD[0]
    hs_ = hs if FS else h
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_N"]), n_tiles + n_sh)
    _down_kernel[grid](
        h, hs_, rowidx, weights_TK, wd_EFD, sd, acc, cnt[1:], out, tm, n_tiles, T, F, FS, D, K,
        h.stride(0), hs_.stride(0), wd_EFD.stride(0), wd_EFD.stride(1), wd_EFD.stride(2), sd.stride(0), sd.stride(1),
        out.stride(0), ACC64=acc64, PREC=_prec(h.dtype), BM=16, BLOCK_TO=triton.next_power_of_2(T), **_pdl(dev),
    )  # fmt: skip
    return out


# The shared experts' gate/up run in the router's launch (True) or as extra tiles of the routed
# gate/up launch (False). Measured on the H200 (DeepSeek-V2-Lite, docs/kernels-notes.md run 7):
# whole op 49.5 vs 49.6 us at T=1, 172.0 vs 175.2 us at T=8; the bench's layer numbers used True.
SHARED_IN_ROUTER = True


def router_warps_from_env() -> int | None:
    """MOECODER_ROUTER_WARPS=auto|1|2|4|8: the warps of launch 1 (auto: 4 or 8 by size; 1: every
    reduction of the last program by shuffles, the shared experts' gate/up then in launch 2)."""
    import os

    v = os.environ.get("MOECODER_ROUTER_WARPS", "auto").strip().lower() or "auto"
    if v == "auto":
        return None
    if v not in ("1", "2", "4", "8"):
        raise ValueError(f"MOECODER_ROUTER_WARPS must be one of auto, 1, 2, 4, 8; got {v!r}")
    return int(v)


def moe_layer_decode(x_TD, router_w_ED, bias_E, top_k, score_func, renormalize, n_groups, topk_groups, group_score,
                     routed_scaling, wg_EDF, wu_EDF, wd_EFD, sg_DF=None, su_DF=None, sd_FD=None,
                     shared_in_router=None, router_warps=None):  # fmt: skip
    """The MoE layer's forward for 1 <= T <= MAX_TOKENS tokens in three launches: (out_TD, weights_TK, experts_TK).

    Same semantics as ``kernels.reference.moe_layer_decode``. Weights already in ``x_TD``'s dtype
    (the router's in any float dtype: its GEMV is fp32); any strides with unit stride somewhere.
    """
    T = x_TD.shape[0]
    K = int(top_k)
    assert 1 <= T <= MAX_TOKENS and x_TD.stride(1) == 1 and wg_EDF.stride() == wu_EDF.stride()
    assert sg_DF is None or sg_DF.stride() == su_DF.stride()
    if router_warps is None:
        router_warps = router_warps_from_env()
    if router_warps == 1 and shared_in_router is None:
        shared_in_router = False  # one warp would also run the shared GEMV programs of launch 1
    early = SHARED_IN_ROUTER if shared_in_router is None else shared_in_router
    sh1 = (sg_DF, su_DF) if early else (None, None)
    w, ex, rowidx, tm, n_tiles, hs = route_plan(x_TD, router_w_ED, bias_E, K, score_func, renormalize, n_groups,
                                                topk_groups, group_score, routed_scaling, *sh1,
                                                num_warps=router_warps)  # fmt: skip
    if early:
        h, _ = gate_up(x_TD, rowidx, tm, n_tiles, K, wg_EDF, wu_EDF)
    else:
        h, hs = gate_up(x_TD, rowidx, tm, n_tiles, K, wg_EDF, wu_EDF, sg_DF, su_DF)
    out = down_combine(h, hs, rowidx, w, tm, n_tiles, T, K, wd_EFD, sd_FD)
    return out, w, ex
