"""The MoE feed-forward block: fp32 router, stacked routed experts, shared experts, balance losses.

Dropless: every token goes through exactly ``top_k`` routed experts (no capacity factor).
The routed-expert math runs only through the public ops of ``kernels``.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model.config import ModelConfig
from model.layers import SwiGLU


class GroupedExperts(nn.Module):
    """The routed experts as stacked weights, one SwiGLU MLP per expert.

    A module of its own so that scale-out can place it on the expert mesh (expert
    parallelism swaps ``experts_fn`` for the all-to-all version; see model/parallel.py).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w_up = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.experts_fn = kernels.moe_experts

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        return self.experts_fn(x_TD, weights_TK, experts_TK, self.w_gate, self.w_up, self.w_down)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, Fh = cfg.n_experts, cfg.dim, cfg.expert_hidden
        self.n_experts, self.top_k = E, cfg.top_k
        self.score_func, self.renormalize = cfg.score_func, cfg.route_renormalize
        self.aux_loss_coef, self.z_loss_coef = cfg.aux_loss_coef, cfg.z_loss_coef
        self.use_bias = cfg.bias_update_rate > 0
        self.n_groups, self.topk_groups, self.group_score = cfg.n_groups, cfg.topk_groups, cfg.group_score
        self.routed_scaling = cfg.routed_scaling
        self.gate = nn.Linear(D, E, bias=False)  # the router; always evaluated in float32
        self.experts = GroupedExperts(E, D, Fh)
        self.shared = SwiGLU(D, cfg.n_shared_experts * Fh) if cfg.n_shared_experts > 0 else None
        # DeepSeek-V3 selection bias: shifts which experts are chosen, never the weights.
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        # tokens per expert accumulated over training forwards since the last bias update
        self.register_buffer("counts_acc", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.last: dict[str, torch.Tensor] = {}

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        y, shared = self.forward_parts(x_BTD)
        if shared is not None:
            y = y + shared
        return y.to(x_BTD.dtype)

    def forward_parts(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(routed experts' output, shared experts' output or None), both [B, T, D]: the caller adds them
        (``forward``), or the next residual norm does (``kernels.add_rms_norm``'s ``delta2``, in inference)."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        if self._layer_decode_ok(x_TD):
            return self._forward_layer_decode(x_TD).reshape(B, T, D).to(x_BTD.dtype), None
        if self._router_kernel_ok(x_TD):  # inference on a GPU: no float32 copy of x first
            logits_TE = kernels.router_logits(x_TD, self.gate.weight)
        else:
            with torch.autocast(x_TD.device.type, enabled=False):
                logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        bias = self.expert_bias if self.use_bias else None
        if self.topk_groups < self.n_groups:
            weights_TK, experts_TK = self._route_groups(logits_TE, bias)
        else:
            weights_TK, experts_TK = kernels.route(logits_TE, self.top_k, self.score_func, bias, self.renormalize)
        if self.routed_scaling != 1.0:
            weights_TK = weights_TK * self.routed_scaling

        x_in = x_TD
        if torch.is_autocast_enabled(x_TD.device.type):
            x_in = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        y_TD = self.experts(x_in, weights_TK, experts_TK)
        shared = self.shared(x_in).reshape(B, T, D) if self.shared is not None else None
        self._record(logits_TE, experts_TK)
        return y_TD.reshape(B, T, D), shared

    def _router_kernel_ok(self, x_TD: torch.Tensor) -> bool:
        """Inference on the Triton path with x and the router weight in one dtype, opt-in (MOECODER_ROUTER_KERNEL=1):
        on an H100 it was no faster than the float32 copy + cuBLAS GEMM at 64 experts and 5% slower at 128
        (docs/benchmarks.md, "Re-measured after the fused-norms fix")."""
        if torch.is_grad_enabled() or type(self.gate) is not nn.Linear or os.environ.get("MOECODER_ROUTER_KERNEL") != "1":
            return False
        w = self.gate.weight
        return x_TD.dtype == w.dtype and x_TD.stride(1) == 1 and w.stride(1) == 1 and kernels.backend(x_TD) == "triton"

    def _layer_decode_ok(self, x_TD: torch.Tensor) -> bool:
        """Inference on a few tokens with plain (not quantised, not expert-parallel) weights: the whole
        layer as one ``kernels.moe_layer_decode`` call (three launches on the Triton path) when
        ``kernels.use_moe_layer_decode`` says so (MOECODER_DECODE, issue #18)."""
        if torch.is_grad_enabled() or self.training or type(self.experts) is not GroupedExperts:
            return False
        if self.experts.experts_fn is not kernels.moe_experts or type(self.gate) is not nn.Linear:
            return False
        sh = self.shared
        if sh is not None and not (type(sh) is SwiGLU and all(type(m) is nn.Linear for m in (sh.w1, sh.w2, sh.w3))):
            return False
        return kernels.use_moe_layer_decode(x_TD, self.n_experts, self.top_k)

    def _forward_layer_decode(self, x_TD: torch.Tensor) -> torch.Tensor:
        x_in = x_TD
        if torch.is_autocast_enabled(x_TD.device.type):
            x_in = x_TD.to(torch.get_autocast_dtype(x_TD.device.type))
        ex, sh = self.experts, self.shared
        shared = () if sh is None else (sh.w1.weight.t(), sh.w3.weight.t(), sh.w2.weight.t())
        y_TD, _, experts_TK = kernels.moe_layer_decode(
            x_in, self.gate.weight, self.expert_bias if self.use_bias else None, self.top_k, self.score_func,
            self.renormalize, self.n_groups, self.topk_groups, self.group_score, self.routed_scaling,
            ex.w_gate, ex.w_up, ex.w_down, *shared)  # fmt: skip
        self._record(x_TD, experts_TK)  # counts only (no grad, so no losses)
        return y_TD

    def _route_groups(self, logits_TE: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Group-limited routing (DeepSeek): only experts of the ``topk_groups`` best groups
        compete. Groups are scored by their best expert ("max", V2) or the sum of their two
        best biased scores ("top2sum", V3); the other groups are masked before
        ``kernels.route`` picks the top-k (softmax keeps the order of the masked choice
        scores); the weights are the unbiased scores of the chosen experts."""
        T, E = logits_TE.shape
        scores = logits_TE.softmax(-1) if self.score_func == "softmax" else logits_TE.sigmoid()
        choice = scores if bias is None else scores + bias
        grouped = choice.view(T, self.n_groups, E // self.n_groups)
        g = grouped.amax(-1) if self.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(1, g.topk(self.topk_groups, dim=-1).indices, True)
        masked = choice.masked_fill(~keep.repeat_interleave(E // self.n_groups, dim=1), float("-inf"))
        _, experts_TK = kernels.route(masked, self.top_k, "softmax", None, False)
        weights_TK = scores.gather(-1, experts_TK)
        if self.renormalize and self.top_k > 1:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        return weights_TK, experts_TK

    def _expert_counts(self, experts_TK: torch.Tensor) -> torch.Tensor:
        """Assignments per expert (float32 [E]) by scatter-add, not torch.bincount: bincount on CUDA
        reads the ids' min/max back to size its output, two host syncs per MoE layer."""
        idx = experts_TK.reshape(-1)
        return torch.zeros(self.n_experts, device=idx.device).index_add_(0, idx, torch.ones(idx.numel(), device=idx.device))

    def _record(self, logits_TE: torch.Tensor, experts_TK: torch.Tensor) -> None:
        """Tensor statistics of this forward (no host sync) and, when training, the losses."""
        if experts_TK.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # CUDA graph capture (static decode): statistics are not needed there
        counts = self._expert_counts(experts_TK)
        last = {"counts": counts}
        if self.training:
            self.counts_acc += counts
        if torch.is_grad_enabled() and (self.aux_loss_coef > 0 or self.z_loss_coef > 0):
            if self.score_func == "softmax":
                probs = logits_TE.softmax(-1)
            else:
                s = logits_TE.sigmoid()
                probs = s / s.sum(-1, keepdim=True)
            frac = counts / counts.sum().clamp_min(1)  # f_i: share of assignments (no grad)
            last["balance_loss"] = self.n_experts * (frac * probs.mean(0)).sum()
            last["z_loss"] = torch.logsumexp(logits_TE, dim=-1).square().mean()
        self.last = last

    def aux_loss(self) -> torch.Tensor:
        """Weighted balance + z loss of the last forward (zero if disabled or not computed)."""
        total = self.expert_bias.new_zeros(())
        if "balance_loss" in self.last:
            total = total + self.aux_loss_coef * self.last["balance_loss"] + self.z_loss_coef * self.last["z_loss"]
        return total

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor, rate: float) -> None:
        """Sign-based DeepSeek-V3 update: raise the bias of underloaded experts, lower overloaded."""
        counts = counts_E.to(self.expert_bias.device).float()
        self.expert_bias += rate * torch.sign(counts.mean() - counts)

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.normal_(self.experts.w_gate, std=std)
        nn.init.normal_(self.experts.w_up, std=std)
        nn.init.normal_(self.experts.w_down, std=out_std)
        self.expert_bias.zero_()
        self.counts_acc.zero_()
