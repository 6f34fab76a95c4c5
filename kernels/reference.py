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
