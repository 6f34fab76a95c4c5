"""Tensor ops of the MoE layer: plain-PyTorch references and Triton kernels.

Every public op dispatches here: the Triton path (``kernels.autograd``, built on
``kernels.triton_ops``) for CUDA tensors, the reference (``kernels.reference``) elsewhere.
``MOECODER_KERNELS=reference|triton`` forces one (``auto``, the default, picks by device).
Forcing ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before this package is
imported (the interpreter, for tests).

In ``auto`` mode the routed experts on CPU tensors take ``kernels.cpu.moe_experts`` (the
same math without the permutation machinery; faster than the reference at every token count
measured, 1 to 4096, and ~2x at decode's T = 1); ``reference`` forces the plain reference.
"""

from __future__ import annotations

import os

from kernels import cpu, reference
from kernels.reference import moe_experts_loop

__all__ = [
    "add_rms_norm",
    "backend",
    "decode_attention",
    "grouped_mm",
    "mla_keys",
    "moe_experts",
    "moe_experts_loop",
    "moe_layer_decode",
    "norm_linear",
    "permute",
    "qk_rope_cache",
    "rope",
    "route",
    "router_logits",
    "swiglu",
    "unpermute",
    "use_moe_layer_decode",
]

_MODES = ("auto", "reference", "triton")


def _mode() -> str:
    mode = os.environ.get("MOECODER_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"MOECODER_KERNELS must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode


def _triton_module():
    try:
        from kernels import autograd
    except ImportError as exc:  # pragma: no cover - triton missing on this platform
        raise RuntimeError(f"the Triton kernels are unavailable: {exc}") from exc
    return autograd


def backend(tensor) -> str:
    """'triton' or 'reference': the path the ops take for this tensor now."""
    mode = _mode()
    if mode == "reference":
        return "reference"
    if mode == "triton":
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "MOECODER_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before import)"
            )
        return "triton"
    if tensor.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "reference"
        return "triton"
    return "reference"


def _impl(tensor):
    return _triton_module() if backend(tensor) == "triton" else reference


def route(logits_TE, top_k, score_func="softmax", bias_E=None, renormalize=True):
    return _impl(logits_TE).route(logits_TE, top_k, score_func, bias_E, renormalize)


def permute(x_TD, experts_TK, num_experts, pad_to=1):
    return _impl(x_TD).permute(x_TD, experts_TK, num_experts, pad_to)


def unpermute(y_ND, weights_TK, row_index_N, T):
    return _impl(y_ND).unpermute(y_ND, weights_TK, row_index_N, T)


def grouped_mm(x_ND, w_EDF, offsets_E1):
    return _impl(x_ND).grouped_mm(x_ND, w_EDF, offsets_E1)


def swiglu(gate_NF, up_NF):
    return _impl(gate_NF).swiglu(gate_NF, up_NF)


def moe_experts(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD):
    if x_TD.device.type == "cpu" and _mode() == "auto":
        return cpu.moe_experts(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)
    return _impl(x_TD).moe_experts(x_TD, weights_TK, experts_TK, w_gate_EDF, w_up_EDF, w_down_EFD)


def use_moe_layer_decode(x_TD, E: int, K: int) -> bool:
    """Whether a MoE layer's inference forward of these T tokens should call ``moe_layer_decode``
    (the Triton path only; ``MOECODER_DECODE`` says when: see ``kernels.autograd``)."""
    if backend(x_TD) != "triton":
        return False
    return _triton_module().use_moe_layer_decode(x_TD.shape[0], E, K)


def moe_layer_decode(x_TD, router_w_ED, bias_E, top_k, score_func, renormalize, n_groups, topk_groups, group_score,
                     routed_scaling, w_gate_EDF, w_up_EDF, w_down_EFD, shared_gate_DF=None, shared_up_DF=None,
                     shared_down_FD=None):  # fmt: skip
    """The MoE layer's inference forward (router, routing, routed + shared experts) for a few tokens:
    (out_TD, weights_TK, experts_TK). No autograd. Shared-expert weights in ``x @ W`` layout."""
    return _impl(x_TD).moe_layer_decode(x_TD, router_w_ED, bias_E, top_k, score_func, renormalize, n_groups,
                                        topk_groups, group_score, routed_scaling, w_gate_EDF, w_up_EDF, w_down_EFD,
                                        shared_gate_DF, shared_up_DF, shared_down_FD)  # fmt: skip


# ---------------------------------------------------------------- fused single-token decode (issue #12)
def _decode_impl(tensor):
    if backend(tensor) == "triton":
        from kernels import triton_decode

        return triton_decode
    return reference


def add_rms_norm(x, delta, weight, eps, delta2=None):
    """(h, RMSNorm(h) * weight) with h = x + (delta + delta2); ``delta``, ``delta2`` may be None
    (the sum of two parts, e.g. routed and shared experts, is rounded first as in the eager path). Inference only."""
    return _decode_impl(x).add_rms_norm(x, delta, weight, eps, delta2)


def router_logits(x_TD, w_ED):
    """The router's logits [T, E] in float32 from x and W of one dtype, without a float32 copy of x
    on the Triton path. Inference only."""
    return _decode_impl(x_TD).router_logits(x_TD, w_ED)


def mla_keys(kv_BLHX, pe_BLR, nope_dim):
    """MLA prefill keys [B, L, H, nope_dim + rope] from the key/value up-projection's output [B, L, H, nope + v]
    and the shared rotary key [B, L, rope], in one pass on the Triton path. Inference only."""
    return _decode_impl(kv_BLHX).mla_keys(kv_BLHX, pe_BLR, nope_dim)


def norm_linear(x, delta, norm_weight, eps, weight, bias=None):
    """One token row: (RMSNorm(x + delta) * norm_weight @ weight^T + bias, x + delta) in one launch on the
    Triton path (no separate norm launch before the GEMV). ``delta`` / ``norm_weight`` may be None. Inference only."""
    return _decode_impl(x).norm_linear(x, delta, norm_weight, eps, weight, bias)


def rope(x_BHTD, cos_BTd, sin_BTd, out=None):
    """RoPE over [B, H, T, Dh] (any strides) with cos/sin [B or 1, T, Dh/2]; ``out=x`` in place. Inference only."""
    return _decode_impl(x_BHTD).rope(x_BHTD, cos_BTd, sin_BTd, out)


def qk_rope_cache(qkv_BX, q_weight, k_weight, cos_Bd, sin_Bd, k_cache, v_cache, pos, n_heads, n_kv_heads, eps):
    """One decode token: per-head QK-norm (optional), RoPE, k/v into the static cache at ``pos``; returns q."""
    return _decode_impl(qkv_BX).qk_rope_cache(qkv_BX, q_weight, k_weight, cos_Bd, sin_Bd, k_cache, v_cache, pos,
                                             n_heads, n_kv_heads, eps)


def mla_rope_cache(q_BX, ckv_BX, norm_weight, eps, cos_Bd, sin_Bd, c_cache, pe_cache, pos, n_heads, nope_dim):
    """MLA, one decode token: normed latent and rotated rotary key into the caches at ``pos``; returns the
    queries' rotated rotary parts [B, H, Dr]."""
    return _decode_impl(q_BX).mla_rope_cache(q_BX, ckv_BX, norm_weight, eps, cos_Bd, sin_Bd, c_cache, pe_cache,
                                             pos, n_heads, nope_dim)


def decode_attention(q_BHD, k1_BGLD, v_BGLD, pos, pad_B=None, scale=None, k2_BGLD=None, q2_BHD=None):
    """One query token per row against a static cache up to slot ``pos`` (GQA; MLA with ``k2``, whose
    query part may come as its own tensor ``q2_BHD``)."""
    return _decode_impl(q_BHD).decode_attention(q_BHD, k1_BGLD, v_BGLD, pos, pad_B, scale, k2_BGLD, q2_BHD)
