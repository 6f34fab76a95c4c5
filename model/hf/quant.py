"""Weight-only quantisation at load time, for CPU use: ``int8`` (symmetric, one scale per
output channel) and ``int4`` (symmetric, one scale per group of 32 input values, two values
per byte). Activations stay float32; weights are dequantised when used — a linear layer's
whole matrix, the routed experts only for the experts a forward actually picked.

Quantised in the [out, in] layout (reduction over the input dim) for every matrix: Linear
weights as they are, our expert stacks [E, D, F] / [E, F, D] per expert, transposed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

GROUP = 32


def quantize(w_OI: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of ``w`` [..., out, in]: int8 [..., out, in] + scale [..., out, 1], or
    int4 packed uint8 [..., out, in / 2] + scale [..., out, in / 32]."""
    w = w_OI.float()
    if bits == 8:
        scale = (w.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-10)
        return torch.round(w / scale).clamp_(-127, 127).to(torch.int8), scale
    *lead, O, I = w.shape
    g = w.reshape(*lead, O, I // GROUP, GROUP)
    scale = (g.abs().amax(-1, keepdim=True) / 7.0).clamp_min(1e-10)
    q = (torch.round(g / scale).clamp_(-8, 7) + 8).to(torch.uint8).reshape(*lead, O, I)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous(), scale.squeeze(-1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    if bits == 8:
        return (q.to(dtype) * scale.to(dtype))
    lo, hi = (q & 0xF), (q >> 4)
    v = torch.stack([lo, hi], dim=-1).reshape(*q.shape[:-1], q.shape[-1] * 2).to(dtype) - 8
    *lead, O, I = v.shape
    return (v.view(*lead, O, I // GROUP, GROUP) * scale.to(dtype)[..., None]).view(*lead, O, I)


def _shapes(out: int, inp: int, bits: int, lead: tuple[int, ...] = ()) -> tuple[tuple, tuple, torch.dtype]:
    if bits == 8:
        return (*lead, out, inp), (*lead, out, 1), torch.int8
    if inp % GROUP:
        raise ValueError(f"int4 needs input dims divisible by {GROUP}, got {inp}")
    return (*lead, out, inp // 2), (*lead, out, inp // GROUP), torch.uint8


class QuantLinear(nn.Module):
    """A bias-free or biased linear layer with weight-only int8/int4 weights."""

    def __init__(self, inp: int, out: int, bits: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.dtype = inp, out, bits, dtype
        qs, ss, qd = _shapes(out, inp, bits)
        self.register_buffer("qweight", torch.zeros(qs, dtype=qd))
        self.register_buffer("scale", torch.zeros(ss, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype)) if bias else None

    def set_weight(self, w_OI: torch.Tensor) -> None:
        q, s = quantize(w_OI, self.bits)
        self.qweight.copy_(q)
        self.scale.copy_(s.half())

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.qweight, self.scale, self.bits, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class QuantExperts(nn.Module):
    """Routed experts with weight-only int8/int4 stacks; a forward dequantises only the
    experts its tokens picked and runs them through ``kernels.moe_experts``."""

    def __init__(self, n_experts: int, dim: int, hidden: int, bits: int, dtype=torch.float32):
        super().__init__()
        self.bits, self.dtype = bits, dtype
        for name, (o, i) in {"w_gate": (hidden, dim), "w_up": (hidden, dim), "w_down": (dim, hidden)}.items():
            qs, ss, qd = _shapes(o, i, bits, (n_experts,))
            self.register_buffer(f"{name}_q", torch.zeros(qs, dtype=qd))
            self.register_buffer(f"{name}_s", torch.zeros(ss, dtype=torch.float16))

    def set_expert(self, name: str, e: int, w_ours: torch.Tensor) -> None:
        """``w_ours`` in our layout ([D, F] for w_gate/w_up, [F, D] for w_down)."""
        q, s = quantize(w_ours.t(), self.bits)
        getattr(self, f"{name}_q")[e].copy_(q)
        getattr(self, f"{name}_s")[e].copy_(s.half())

    def _weights(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        q, s = getattr(self, f"{name}_q")[ids], getattr(self, f"{name}_s")[ids]
        return dequantize(q, s, self.bits, self.dtype).transpose(1, 2).contiguous()

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        used, local = torch.unique(experts_TK, return_inverse=True)
        wg, wu, wd = (self._weights(n, used).to(x_TD.dtype) for n in ("w_gate", "w_up", "w_down"))
        return kernels.moe_experts(x_TD, weights_TK, local.view_as(experts_TK), wg, wu, wd)
