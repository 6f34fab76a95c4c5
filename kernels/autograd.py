"""``torch.autograd.Function`` wrappers around the Triton kernels (forward and backward).

Same signatures and semantics as ``kernels.reference``. ``moe_experts`` is one Function
for the whole routed-expert computation: gather fused into the gate/up GEMM, SwiGLU in its
epilogue, the down GEMM, and a deterministic weighted sum over k; its backward fuses the
SwiGLU derivative and the routing-weight gradient into the first backward GEMM.
"""

from __future__ import annotations

import os

import torch

from kernels import triton_ops as ops


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, score_func, renormalize):
        w, e = ops.route_fwd(logits_TE, top_k, score_func, bias_E, renormalize)
        ctx.save_for_backward(logits_TE, w, e)
        ctx.score_func, ctx.renormalize = score_func, renormalize
        ctx.mark_non_differentiable(e)
        return w, e

    @staticmethod
    def backward(ctx, dw, _de):
        logits, w, e = ctx.saved_tensors
        dl = ops.route_bwd(logits, w, e, dw, ctx.score_func, ctx.renormalize)
        return dl, None, None, None, None


def route(logits_TE, top_k, score_func="softmax", bias_E=None, renormalize=True):
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown score_func {score_func!r}")
    return _Route.apply(logits_TE, bias_E, int(top_k), score_func, bool(renormalize))


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, experts_TK, num_experts, pad_to):
        T, K = experts_TK.shape
        counts, offsets, row_index, dest = ops.permute_index(experts_TK, num_experts, pad_to)
        x_perm, _ = ops.gather_rows(x_TD, row_index, K)
        ctx.save_for_backward(dest)
        ctx.T, ctx.K = T, K
        ctx.mark_non_differentiable(counts, offsets, row_index)
        return x_perm, counts, offsets, row_index

    @staticmethod
    def backward(ctx, dxp, *_):
        (dest,) = ctx.saved_tensors
        return ops.combine(dxp.contiguous(), dest, ctx.T, ctx.K), None, None, None


def permute(x_TD, experts_TK, num_experts, pad_to=1):
    return _Permute.apply(x_TD.contiguous(), experts_TK, int(num_experts), int(pad_to))


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, weights_TK, row_index_N, T):
        K = weights_TK.shape[1]
        pos = ops.inverse_index(row_index_N, T * K)
        w = weights_TK.contiguous()
        out = ops.combine(y_ND, pos, T, K, scale_TK=w)
        ctx.save_for_backward(y_ND, w, row_index_N)
        ctx.K = K
        return out

    @staticmethod
    def backward(ctx, dout):
        y, w, row_index = ctx.saved_tensors
        dy, dw = ops.gather_rows(dout.contiguous(), row_index, ctx.K, scale=w.reshape(-1), dot_with=y)
        return dy, dw.view(w.shape).to(w.dtype), None, None


def unpermute(y_ND, weights_TK, row_index_N, T):
    return _Unpermute.apply(y_ND.contiguous(), weights_TK, row_index_N, int(T))


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_EDF, offsets_E1):
        N = x_ND.shape[0]
        E = w_EDF.shape[0]
        bm = ops.block_m_for(N, E)
        tm, n_tiles = ops.tile_map(offsets_E1, bm, N)
        y = ops.gmm(x_ND, w_EDF, tm, n_tiles, bm, N)
        if N:
            _zero_uncovered(y, offsets_E1)
        ctx.save_for_backward(x_ND, w_EDF, offsets_E1, tm)
        ctx.meta = (bm, n_tiles)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets, tm = ctx.saved_tensors
        bm, n_tiles = ctx.meta
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = ops.gmm(dy, w.transpose(1, 2), tm, n_tiles, bm, x.shape[0])
            if x.shape[0]:
                _zero_uncovered(dx, offsets)
        if ctx.needs_input_grad[1]:
            dw, _ = ops.gmm_dw(x, dy, offsets)
        return dx, dw, None


def _zero_uncovered(y, offsets):
    """Rows outside every group are zero (as in the reference); no host sync."""
    rows = torch.arange(y.shape[0], device=y.device)
    outside = (rows < offsets[0]) | (rows >= offsets[-1])
    y.masked_fill_(outside[:, None], 0)


def grouped_mm(x_ND, w_EDF, offsets_E1):
    w = w_EDF.to(x_ND.dtype)
    return _GroupedMM.apply(x_ND.contiguous(), w, offsets_E1.to(torch.int64).contiguous())


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return ops.swiglu_fwd(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return ops.swiglu_bwd(g, u, dh)


def swiglu(gate_NF, up_NF):
    if gate_NF.shape != up_NF.shape:
        raise ValueError(f"swiglu: gate {tuple(gate_NF.shape)} and up {tuple(up_NF.shape)} differ")
    return _SwiGLU.apply(gate_NF.contiguous(), up_NF.contiguous())


class _MoEExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, experts_TK, wg, wu, wd):
        T, K = experts_TK.shape
        E = wg.shape[0]
        N = T * K
        need_grad = any(ctx.needs_input_grad)
        if not need_grad:
            ctx.meta = (T, K, 0, 0)
            return _experts_forward(x_TD, weights_TK, experts_TK, wg, wu, wd)
        bm = ops.block_m_for(N, E)
        offsets, row_index, dest, tm, n_tiles = ops.plan(experts_TK, E, bm)
        g, u, h = ops.gmm_gu(x_TD, wg, wu, tm, n_tiles, bm, N, idx=row_index, div=K, save_gu=need_grad)
        y = ops.gmm(h, wd, tm, n_tiles, bm, N)
        out = ops.combine(y, dest, T, K, scale_TK=weights_TK)
        if need_grad:
            ctx.save_for_backward(x_TD, weights_TK, row_index, dest, offsets, tm, g, u, wg, wu, wd)
        ctx.meta = (T, K, bm, n_tiles)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, row_index, dest, offsets, tm, g, u, wg, wu, wd = ctx.saved_tensors
        T, K, bm, n_tiles = ctx.meta
        dout = dout.contiguous()
        w_flat = w.reshape(-1)
        need_wd = ctx.needs_input_grad[5]
        need_wgu = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        lib = _dw_path(dout, wg) == "grouped_mm"
        tok = row_index // K if lib else None
        dout_s = dout.index_select(0, tok) if lib else None  # dout[token] per permuted row, once
        if lib and _dh_path(dout, wg) == "grouped_mm":  # library GEMM, then the fused epilogue as one pass
            dhu = ops.grouped_mm_rows(dout_s, wd.transpose(1, 2), offsets)
            dg, du, dw_row, hs = ops.dh_epilogue(dhu, g, u, row_index, w_flat, write_hs=need_wd)
            del dhu
        else:
            dg, du, dw_row, hs = ops.gmm_dh(dout, row_index, K, w_flat, wd, g, u, tm, n_tiles, bm, write_hs=need_wd)
        dweights = dw_row[dest].view(T, K).to(w.dtype)
        dx = dwg = dwu = dwd = None
        if ctx.needs_input_grad[0]:
            if lib and _dx_path() == "grouped_mm":  # two library GEMMs; their sum taken in the combine
                dxg = ops.grouped_mm_rows(dg, wg.transpose(1, 2), offsets)
                dxu = ops.grouped_mm_rows(du, wu.transpose(1, 2), offsets)
                dx = ops.combine(dxg, dest, T, K, y2_ND=dxu)
                del dxg, dxu
            else:  # one Triton GEMM with two products (dG Wg^T + dU Wu^T) over the tile map
                dxp = ops.gmm(dg, wg.transpose(1, 2), tm, n_tiles, bm, T * K, a2=du, b2=wu.transpose(1, 2))
                dx = ops.combine(dxp, dest, T, K)
        if lib:  # gathered operands, then the library's K-grouped GEMM
            if need_wd:
                dwd = ops.grouped_at_b(hs, dout_s, offsets)
            del dout_s
            if need_wgu:
                xs = x.index_select(0, tok)
                dwg = ops.grouped_at_b(xs, dg, offsets)
                dwu = ops.grouped_at_b(xs, du, offsets)
        else:
            if need_wd:  # dWd[e] = (s*H)_e^T @ dout[token]: both operands plain loads (pipelined)
                dwd, _ = ops.gmm_dw(hs, dout, offsets, b_mode=1, bidx=row_index, divb=K)
            if need_wgu:
                dwg, dwu = ops.gmm_dw(x, dg, offsets, a_mode=1, aidx=row_index, diva=K, b2=du)
        return dx, dweights, None, dwg, dwu, dwd


# At most this many tokens take the one-launch decode path (``decode_experts``) in "auto";
# more take the tiles path (plan + gate/up + down + combine). 0: on the H200 the one-launch
# path measured slower than the tiles path at T = 1 and 8 on both bench shapes (issue #18,
# docs/kernels-notes.md: layer T=1 62 vs 50 us Qwen3-30B-A3B, 91 vs 78 us DeepSeek-V2-Lite),
# as did the earlier two-launch GEMV path. ``MOECODER_DECODE=fused`` forces it (tested).
DECODE_MAX_TOKENS = 0


# At most this many tokens take the three-launch decode *layer* op (``moe_layer_decode``:
# router GEMV + top-k + plan, gate/up with the shared experts, down + combine) in "auto",
# when the caller (model.moe.MoE) asks ``use_moe_layer_decode``. 8: on the H200 the layer op
# measured faster than the separate ops (torch router, route, tiles path, torch shared experts)
# at T = 1 and T = 8 on both bench shapes (issue #18, docs/benchmarks.md, 2026-12-05 07:50 UTC:
# Qwen3-30B-A3B 46 -> 40 us and 163 -> 147 us, DeepSeek-V2-Lite 76 -> 55 us and 225 -> 183 us);
# T = 2..7 were not measured. ``MOECODER_DECODE=layer`` forces it up to LAYER_FORCED_MAX_TOKENS,
# ``tiles`` / ``fused`` turn it off.
DECODE_LAYER_MAX_TOKENS = 8
LAYER_FORCED_MAX_TOKENS = 8


def _decode_mode() -> str:
    mode = os.environ.get("MOECODER_DECODE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "fused", "tiles", "layer"):
        raise ValueError(f"MOECODER_DECODE must be one of auto, fused, tiles, layer; got {mode!r}")
    return mode


def _use_decode(T: int, K: int) -> bool:
    """MOECODER_DECODE=auto|fused|tiles|layer: the one-launch decode path for few tokens without autograd."""
    mode = _decode_mode()
    if T == 0 or mode in ("tiles", "layer"):
        return False
    return mode == "fused" or T <= DECODE_MAX_TOKENS


def use_moe_layer_decode(T: int, E: int, K: int) -> bool:
    """Whether a MoE layer's inference forward of T tokens should be one ``moe_layer_decode`` call.

    MOECODER_DECODE=layer: for 1 <= T <= LAYER_FORCED_MAX_TOKENS; auto: T <= DECODE_LAYER_MAX_TOKENS;
    fused, tiles: never. Only shapes the kernel holds in registers (E <= 256, T * K <= 128).
    """
    mode = _decode_mode()
    limit = {"layer": LAYER_FORCED_MAX_TOKENS, "auto": DECODE_LAYER_MAX_TOKENS}.get(mode, 0)
    return 1 <= T <= limit and E <= 256 and T * K <= 128


def moe_layer_decode(x_TD, router_w_ED, bias_E, top_k, score_func, renormalize, n_groups, topk_groups, group_score,
                     routed_scaling, w_gate_EDF, w_up_EDF, w_down_EFD, shared_gate_DF=None, shared_up_DF=None,
                     shared_down_FD=None):  # fmt: skip
    """The MoE layer's inference forward for few tokens in three launches (``kernels.triton_moe_layer``)."""
    from kernels import triton_moe_layer as tml

    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown score_func {score_func!r}")
    T, D = x_TD.shape
    E = router_w_ED.shape[0]
    if not 1 <= T <= tml.MAX_TOKENS or E > 256 or not 1 <= top_k <= E or w_gate_EDF.shape[:2] != (E, D):
        raise ValueError(f"moe_layer_decode: T={T} (1..{tml.MAX_TOKENS}), E={E} (<= 256), top_k={top_k}, "
                         f"w_gate {tuple(w_gate_EDF.shape)} for D={D}")  # fmt: skip
    dt = x_TD.dtype
    x = x_TD if x_TD.stride(1) == 1 else x_TD.contiguous()
    wg, wu, wd = (w.to(dt) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    if wg.stride() != wu.stride():
        wg, wu = wg.contiguous(), wu.contiguous()
    sh = ()
    if shared_gate_DF is not None:
        sg, su, sd = (w.to(dt) for w in (shared_gate_DF, shared_up_DF, shared_down_FD))
        if sg.stride() != su.stride():
            sg, su = sg.contiguous(), su.contiguous()
        sh = (sg, su, sd)
    with torch.no_grad():
        return tml.moe_layer_decode(x, router_w_ED.detach(), None if bias_E is None else bias_E.detach(), int(top_k),
                                    score_func, renormalize, n_groups, topk_groups, group_score, routed_scaling,
                                    wg, wu, wd, *sh)  # fmt: skip


def _dh_path(dout, w) -> str:
    """MOECODER_DH=auto|triton|grouped_mm: the backward's first GEMM (dHu = dout[token] @ Wd^T).

    ``triton``: one kernel with the gather and the SwiGLU/routing-weight epilogue fused
    (~230 TFLOP/s on the H200: its epilogue holds too many live tiles, ncu shows 255 registers
    and 12% occupancy); ``grouped_mm`` (auto, with the library dW path): the library GEMM on the
    gathered dout, then the epilogue as one elementwise pass.
    """
    mode = os.environ.get("MOECODER_DH", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "grouped_mm"):
        raise ValueError(f"MOECODER_DH must be one of auto, triton, grouped_mm; got {mode!r}")
    return "grouped_mm" if mode == "auto" else mode


def _dx_path() -> str:
    """MOECODER_DX=auto|triton|grouped_mm: dX's GEMMs (with the library dW path only).

    ``triton``: the dual-product Triton GEMM (~450 TFLOP/s, ncu on the H200); ``grouped_mm``
    (auto): two library GEMMs (~600 each) whose sum the combine kernel takes while it sums
    over k (one extra N x D read).
    """
    mode = os.environ.get("MOECODER_DX", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "grouped_mm"):
        raise ValueError(f"MOECODER_DX must be one of auto, triton, grouped_mm; got {mode!r}")
    return "grouped_mm" if mode == "auto" else mode


def _dw_path(dout, w) -> str:
    """MOECODER_DW=auto|triton|grouped_mm: who computes the weight gradients.

    auto: ``torch._grouped_mm`` for bf16 on a CUDA GPU of compute capability >= 9.0 with
    16-byte aligned rows (it ran at ~600 TFLOP/s where our dW kernels reached ~310 on the H100
    and H200, both shapes, docs/kernels-notes.md); the Triton dW kernels otherwise.
    ``grouped_mm`` forces the gather + grouped path (on CPU/float64: a loop, for tests).
    """
    mode = os.environ.get("MOECODER_DW", "auto").strip().lower() or "auto"
    if mode not in ("auto", "triton", "grouped_mm"):
        raise ValueError(f"MOECODER_DW must be one of auto, triton, grouped_mm; got {mode!r}")
    if mode != "auto":
        return mode
    ok = (
        dout.is_cuda and dout.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(dout.device) >= (9, 0)
        and w.shape[1] % 8 == 0 and w.shape[2] % 8 == 0
    )  # fmt: skip
    return "grouped_mm" if ok else "triton"


def _experts_forward(x_TD, weights_TK, experts_TK, wg, wu, wd):
    """The routed experts' forward without autograd bookkeeping (G and U not kept)."""
    T, K = experts_TK.shape
    E = wg.shape[0]
    N = T * K
    if _use_decode(T, K):  # one launch: experts + combine (few tokens)
        return ops.decode_experts(x_TD, weights_TK, experts_TK, wg, wu, wd)
    bm = ops.block_m_for(N, E)
    _, row_index, dest, tm, n_tiles = ops.plan(experts_TK, E, bm)
    _, _, h = ops.gmm_gu(x_TD, wg, wu, tm, n_tiles, bm, N, idx=row_index, div=K, save_gu=False)
    y = ops.gmm(h, wd, tm, n_tiles, bm, N)
    return ops.combine(y, dest, T, K, scale_TK=weights_TK)


def _check_experts(x_TD, weights_TK, experts_TK, wg, wu, wd):
    if x_TD.dim() != 2 or experts_TK.dim() != 2 or x_TD.shape[0] != experts_TK.shape[0]:
        raise ValueError(f"moe_experts: x {tuple(x_TD.shape)} and experts {tuple(experts_TK.shape)} must be (T, D), (T, K)")
    if weights_TK.shape != experts_TK.shape:
        raise ValueError(f"moe_experts: weights {tuple(weights_TK.shape)} != experts {tuple(experts_TK.shape)}")
    if experts_TK.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"moe_experts: experts must be an integer tensor, got {experts_TK.dtype}")
    E, D, Fh = wg.shape
    if wu.shape != (E, D, Fh) or wd.shape != (E, Fh, D) or x_TD.shape[1] != D:
        raise ValueError(
            f"moe_experts: shapes x {tuple(x_TD.shape)}, w_gate {tuple(wg.shape)}, w_up {tuple(wu.shape)}, "
            f"w_down {tuple(wd.shape)} do not fit (T, D), (E, D, F), (E, D, F), (E, F, D)"
        )


def moe_experts(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
    _check_experts(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
    experts_TK = experts_TK.long()
    dt = x_TD.dtype
    wg, wu, wd = (w.to(dt) for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    if wg.stride() != wu.stride():
        wg, wu = wg.contiguous(), wu.contiguous()
    leaves = (x_TD, weights_TK, wg, wu, wd)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in leaves)):
        # inference (no_grad / inference_mode): ``needs_input_grad`` would still say True for
        # parameters, so decide here: nothing saved for backward, decode path for few tokens
        return _experts_forward(x_TD.contiguous(), weights_TK.contiguous(), experts_TK.contiguous(), wg, wu, wd)
    return _MoEExperts.apply(x_TD.contiguous(), weights_TK.contiguous(), experts_TK.contiguous(), wg, wu, wd)
