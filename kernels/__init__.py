"""Tensor ops of the MoE layer: plain-PyTorch references and Triton kernels."""
