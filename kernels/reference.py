"""Plain-PyTorch reference ops of the MoE layer: the specification.

Short and obvious on purpose; every fast path is tested against these. They run on
any device and dtype and are differentiable through ordinary autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(
    logits_TE: torch.Tensor,
    top_k: int,
    score_func: str = "softmax",
    bias_E: torch.Tensor | None = None,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores -> top-k experts and their weights (float32).

    ``bias_E`` shifts the *selection* only (DeepSeek-V3 auxiliary-loss-free balancing);
    the weights are the unbiased scores of the chosen experts.
    """
    logits = logits_TE.float()
    if score_func == "softmax":
        scores = logits.softmax(dim=-1)
    elif score_func == "sigmoid":
        scores = logits.sigmoid()
    else:
        raise ValueError(f"unknown score_func {score_func!r}")
    choose = scores if bias_E is None else scores + bias_E.float()
    experts_TK = choose.topk(top_k, dim=-1).indices
    weights_TK = scores.gather(-1, experts_TK)
    if renormalize and top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights_TK, experts_TK


def permute(
    x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int, pad_to: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather token rows into expert order (stable), optionally padding each group.

    Returns ``x_perm_ND, counts_E, offsets_E1, row_index_N`` where ``row_index`` maps each
    permuted row to its flat assignment ``t * K + j`` (or -1 for a padding row).
    """
    T, K = experts_TK.shape
    flat = experts_TK.reshape(-1)
    counts_E = torch.bincount(flat, minlength=num_experts)
    order = torch.argsort(flat, stable=True)  # assignment ids sorted by expert
    if pad_to <= 1:
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
        offsets[1:] = counts_E.cumsum(0)
        row_index = order
    else:
        padded = (counts_E + pad_to - 1) // pad_to * pad_to
        offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
        offsets[1:] = padded.cumsum(0)
        row_index = torch.full((int(offsets[-1]),), -1, dtype=torch.int64, device=flat.device)
        starts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
        starts[1:] = counts_E.cumsum(0)
        sorted_experts = flat[order]
        rank_in_group = torch.arange(order.numel(), device=flat.device) - starts[sorted_experts]
        row_index[offsets[sorted_experts] + rank_in_group] = order
    valid = row_index >= 0
    x_perm = x_TD.new_zeros((row_index.numel(), x_TD.shape[1]))
    x_perm = x_perm.index_copy(0, valid.nonzero().squeeze(1), x_TD[row_index[valid] // K])
    return x_perm, counts_E, offsets, row_index


def unpermute(y_ND: torch.Tensor, weights_TK: torch.Tensor, row_index_N: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of ``permute``: scatter rows back, weighted, summed over k."""
    K = weights_TK.shape[1]
    valid = row_index_N >= 0
    rows = row_index_N[valid]
    w = weights_TK.reshape(-1)[rows].to(y_ND.dtype)
    contrib = y_ND[valid] * w[:, None]
    out = y_ND.new_zeros((T, y_ND.shape[1]))
    return out.index_add(0, rows // K, contrib)


def grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
    """Row group e (rows ``offsets[e]:offsets[e+1]``) times ``w[e]``; empty groups are fine."""
    out = x_ND.new_zeros((x_ND.shape[0], w_EDF.shape[2]))
    offs = offsets_E1.tolist()
    for e in range(w_EDF.shape[0]):
        a, b = offs[e], offs[e + 1]
        if b > a:
            out = out.index_copy(0, torch.arange(a, b, device=x_ND.device), x_ND[a:b] @ w_EDF[e])
    return out


def swiglu(gate_NF: torch.Tensor, up_NF: torch.Tensor) -> torch.Tensor:
    return F.silu(gate_NF) * up_NF


def moe_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> torch.Tensor:
    """The routed experts: every token through its k experts (dropless), weighted sum."""
    T = x_TD.shape[0]
    E = w_gate_EDF.shape[0]
    x_perm, _, offsets, row_index = permute(x_TD, experts_TK, E)
    h = swiglu(grouped_mm(x_perm, w_gate_EDF, offsets), grouped_mm(x_perm, w_up_EDF, offsets))
    y_perm = grouped_mm(h, w_down_EFD, offsets)
    return unpermute(y_perm, weights_TK, row_index, T)


def moe_experts_loop(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> torch.Tensor:
    """The same computation as a per-expert Python loop (how HF eager MoE works)."""
    out = torch.zeros_like(x_TD)
    for e in range(w_gate_EDF.shape[0]):
        t, j = (experts_TK == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        h = swiglu(x_TD[t] @ w_gate_EDF[e], x_TD[t] @ w_up_EDF[e]) @ w_down_EFD[e]
        out = out.index_add(0, t, h * weights_TK[t, j, None].to(h.dtype))
    return out


# --------------------------------------------------------------------------------------
# fused single-token decode (issue #12): the specification of kernels.triton_decode


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_rms_norm(x, delta, weight, eps: float, delta2=None):
    """(h, y): h = x + (delta + delta2) (or x when delta is None; delta2 optional), y = RMSNorm(h) * weight
    (fp32 math, x's dtype)."""
    if delta is not None and delta2 is not None:
        delta = delta + delta2
    h = x + delta if delta is not None else x
    a = _acc_dtype(h.dtype)
    y = F.rms_norm(h.to(a), (h.shape[-1],), weight.to(a), eps).to(h.dtype)
    return h, y


def router_logits(x_TD, w_ED):
    """Router logits [T, E] in float32 (float64 for float64 inputs)."""
    acc = _acc_dtype(x_TD.dtype)
    return F.linear(x_TD.to(acc), w_ED.to(acc))


def mla_keys(kv_BLHX, pe_BLR, nope_dim: int):
    """MLA prefill keys [B, L, H, nope + rope]: each head's non-rotary key and the shared rotary key."""
    B, L, H, _ = kv_BLHX.shape
    pe = pe_BLR.to(kv_BLHX.dtype)[:, :, None].expand(B, L, H, pe_BLR.shape[-1])
    return torch.cat([kv_BLHX[..., :nope_dim], pe], dim=-1)


def norm_linear(x, delta, norm_weight, eps: float, weight, bias=None):
    """(y, h): h = x + delta (x when ``delta`` is None), y = RMSNorm(h) * norm_weight @ weight^T + bias
    (no norm when ``norm_weight`` is None); one token row, [1, N] / [1, K] in x's dtype."""
    K = x.shape[-1]
    x = x.reshape(1, K)
    h = x + delta.reshape(1, K) if delta is not None else x
    xn = add_rms_norm(h, None, norm_weight, eps)[1] if norm_weight is not None else h
    return F.linear(xn, weight, bias), h


def rope(x_BHTD, cos_BTd, sin_BTd, out=None):
    """RoPE (GPT-NeoX halves) over [B, H, T, Dh]; cos/sin [B or 1, T, Dh/2]; fp32 math, x's dtype.
    ``out``: written there (``out=x`` rotates in place)."""
    a = _acc_dtype(x_BHTD.dtype)
    x1, x2 = x_BHTD.to(a).chunk(2, dim=-1)
    cos, sin = cos_BTd[:, None].to(a), sin_BTd[:, None].to(a)
    y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x_BHTD.dtype)
    return y if out is None else out.copy_(y)


def qk_rope_cache(qkv_BX, q_weight, k_weight, cos_Bd, sin_Bd, k_cache, v_cache, pos, n_heads: int,
                  n_kv_heads: int, eps: float):
    """Rotated queries [B, H, Dh]; keys (per-head RMSNorm if weights are given, rotated) and values
    written into the caches [B, G, L, Dh] at slot ``pos`` ([1] long tensor)."""
    B = qkv_BX.shape[0]
    Dh = k_cache.shape[-1]
    H, G = n_heads, n_kv_heads
    q, k, v = qkv_BX.view(B, H + 2 * G, Dh).split([H, G, G], dim=1)
    a = _acc_dtype(qkv_BX.dtype)
    if q_weight is not None:
        q = F.rms_norm(q.to(a), (Dh,), q_weight.to(a), eps).to(qkv_BX.dtype)
        k = F.rms_norm(k.to(a), (Dh,), k_weight.to(a), eps).to(qkv_BX.dtype)
    cos = cos_Bd.reshape(-1, 1, Dh // 2).to(a)
    sin = sin_Bd.reshape(-1, 1, Dh // 2).to(a)

    def rope(x):
        x1, x2 = x.to(a).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    q, k = rope(q), rope(k)
    k_cache.index_copy_(2, pos, k[:, :, None].to(k_cache.dtype))
    v_cache.index_copy_(2, pos, v[:, :, None].to(v_cache.dtype))
    return q.contiguous()


def mla_rope_cache(q_BX, ckv_BX, norm_weight, eps: float, cos_Bd, sin_Bd, c_cache, pe_cache, pos,
                   n_heads: int, nope_dim: int):
    """MLA, one decode token: RMSNorm(latent) into ``c_cache`` and the rotated rotary key into
    ``pe_cache`` at slot ``pos``; returns the rotated rotary part of the queries [B, H, Dr]."""
    B = q_BX.shape[0]
    R, Dr = c_cache.shape[-1], pe_cache.shape[-1]
    a = _acc_dtype(q_BX.dtype)
    q_pe = q_BX.view(B, n_heads, nope_dim + Dr)[:, :, nope_dim:]
    lat, k_pe = ckv_BX[:, :R], ckv_BX[:, R:]
    c = F.rms_norm(lat.to(a), (R,), norm_weight.to(a), eps).to(ckv_BX.dtype)
    cos = cos_Bd.reshape(-1, 1, Dr // 2).to(a)
    sin = sin_Bd.reshape(-1, 1, Dr // 2).to(a)

    def rope(x):
        x1, x2 = x.to(a).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    c_cache.index_copy_(2, pos, c[:, None, None].to(c_cache.dtype))
    pe_cache.index_copy_(2, pos, rope(k_pe[:, None])[:, :, None].to(pe_cache.dtype))
    return rope(q_pe).contiguous()


def decode_attention(q_BHD, k1_BGLD, v_BGLD, pos, pad_B=None, scale=None, k2_BGLD=None, q2_BHD=None):
    """One query token per row over cache slots s with pad[b] <= s <= pos (and s == pos) -> [B, H, DV].
    ``q2_BHD``: the query's second part (against ``k2``) as its own tensor."""
    if q2_BHD is not None:
        q_BHD = torch.cat([q_BHD, q2_BHD.to(q_BHD.dtype)], dim=-1)
    B, H, Dq = q_BHD.shape
    G, L = k1_BGLD.shape[1], k1_BGLD.shape[2]
    k = k1_BGLD if k2_BGLD is None else torch.cat([k1_BGLD, k2_BGLD], dim=-1)
    scale = Dq ** -0.5 if scale is None else scale
    R = H // G
    a = _acc_dtype(q_BHD.dtype)
    qf = q_BHD.to(a).view(B, G, R, Dq)
    s = torch.einsum("bgrd,bgld->bgrl", qf, k.to(a)) * scale
    slots = torch.arange(L, device=q_BHD.device)
    ok = (slots <= pos)[None]
    if pad_B is not None:
        ok = ok & ((slots[None] >= pad_B[:, None]) | (slots == pos)[None])
    s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
    o = torch.einsum("bgrl,bgld->bgrd", s.softmax(-1), v_BGLD.to(a))
    return o.reshape(B, H, -1).to(q_BHD.dtype)


# --------------------------------------------------------------------------------------
# the MoE layer for a few tokens (issue #18): the specification of kernels.triton_moe_layer


def route_groups(logits_TE, top_k: int, score_func: str, bias_E, renormalize: bool, n_groups: int,
                 topk_groups: int, group_score: str = "max"):  # fmt: skip
    """Group-limited routing (DeepSeek): only experts of the ``topk_groups`` best groups compete.

    Groups are scored by their best biased score ("max", V2) or the sum of their two best ("top2sum",
    V3); the weights are the unbiased scores of the chosen experts (renormalised if asked).
    """
    T, E = logits_TE.shape
    logits = logits_TE.float()
    scores = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    choice = scores if bias_E is None else scores + bias_E.float()
    grouped = choice.view(T, n_groups, E // n_groups)
    g = grouped.amax(-1) if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(topk_groups, dim=-1).indices, True)
    masked = choice.masked_fill(~keep.repeat_interleave(E // n_groups, dim=1), float("-inf"))
    experts_TK = masked.topk(top_k, dim=-1).indices
    weights_TK = scores.gather(-1, experts_TK)
    if renormalize and top_k > 1:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights_TK, experts_TK


def moe_layer_decode(x_TD, router_w_ED, bias_E, top_k: int, score_func: str, renormalize: bool, n_groups: int,
                     topk_groups: int, group_score: str, routed_scaling: float, w_gate_EDF, w_up_EDF, w_down_EFD,
                     shared_gate_DF=None, shared_up_DF=None, shared_down_FD=None):  # fmt: skip
    """The whole MoE layer's forward (as ``model.moe.MoE`` computes it): fp32 router, routing
    (group-limited when ``topk_groups < n_groups``), routed scaling, routed experts, plus the
    shared experts (SwiGLU with weights in ``x @ W`` layout) when given. -> (out_TD, weights_TK, experts_TK)."""
    logits = x_TD.float() @ router_w_ED.float().t()
    if topk_groups < n_groups:
        w, e = route_groups(logits, top_k, score_func, bias_E, renormalize, n_groups, topk_groups, group_score)
    else:
        w, e = route(logits, top_k, score_func, bias_E, renormalize)
    if routed_scaling != 1.0:
        w = w * routed_scaling
    y = moe_experts(x_TD, w, e, w_gate_EDF, w_up_EDF, w_down_EFD)
    if shared_gate_DF is not None:
        y = y + (F.silu(x_TD @ shared_gate_DF) * (x_TD @ shared_up_DF)) @ shared_down_FD
    return y, w, e
