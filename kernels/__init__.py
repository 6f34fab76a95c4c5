"""Tensor ops of the MoE layer: plain-PyTorch references and Triton kernels.

Public ops dispatch here: the Triton path for CUDA tensors (once ``kernels.triton_ops``
provides it), the reference elsewhere. ``MOECODER_KERNELS=reference|triton`` forces one.
"""

from __future__ import annotations

from kernels.reference import grouped_mm, moe_experts, moe_experts_loop, permute, route, swiglu, unpermute

__all__ = ["grouped_mm", "moe_experts", "moe_experts_loop", "permute", "route", "swiglu", "unpermute"]
