"""A CPU fast path for the routed experts: the reference math without the permutation machinery.

``moe_experts`` here has the signature and result (up to float rounding) of
``kernels.reference.moe_experts``. On CPU at small token counts (decode steps, short
prompts) the reference spends most of its time on bookkeeping (bincount, argsort, index
copies of whole buffers per expert); this version reads the chosen experts on the host and
loops only over them: per expert one gather of its tokens, three plain matmuls and one
weighted ``index_add_``. Differentiable through ordinary autograd, like the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
) -> torch.Tensor:
    """The routed experts: every token through its k experts (dropless), weighted sum."""
    T, K = experts_TK.shape
    if T == 1:  # a decode step: k vector-matrix products, no gathers at all
        out = None
        w = weights_TK[0].to(x_TD.dtype)
        ids = experts_TK[0].tolist()
        for j in sorted(range(K), key=ids.__getitem__):  # summed in expert order, as the reference does
            e = ids[j]
            y = (F.silu(x_TD @ w_gate_EDF[e]) * (x_TD @ w_up_EDF[e])) @ w_down_EFD[e]
            y = y * w[j]
            out = y if out is None else out + y
        return out if out is not None else torch.zeros_like(x_TD)
    flat = experts_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)  # assignments t * K + j, grouped by expert
    counts = torch.bincount(flat, minlength=w_gate_EDF.shape[0]).tolist()
    w_flat = weights_TK.reshape(-1).to(x_TD.dtype)
    out = torch.zeros_like(x_TD)
    a = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[a:a + n]
        a += n
        t = rows // K
        xe = x_TD.index_select(0, t)
        y = (F.silu(xe @ w_gate_EDF[e]) * (xe @ w_up_EDF[e])) @ w_down_EFD[e]
        out.index_add_(0, t, y * w_flat.index_select(0, rows)[:, None])
    return out
