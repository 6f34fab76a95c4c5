"""Model configuration: one dataclass and named presets (``tiny``, ``small``, ``base``).

Routing is always dropless: every token reaches its ``top_k`` experts; there is no
capacity factor. Load balancing: the Switch/GShard auxiliary loss (``aux_loss_coef``),
the router z-loss (``z_loss_coef``) and the auxiliary-loss-free per-expert selection
bias of DeepSeek-V3 (``bias_update_rate``; 0 turns it off).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads % n_kv_heads == 0
    rope_theta: float = 10000.0
    max_seq_len: int = 256  # context length
    norm_eps: float = 1e-5
    # feed-forward: the first n_dense_layers are dense SwiGLU blocks, the rest MoE
    n_dense_layers: int = 1
    dense_hidden: int = 128
    n_experts: int = 4  # routed experts
    n_shared_experts: int = 1  # shared expert hidden size = n_shared_experts * expert_hidden
    top_k: int = 2
    expert_hidden: int = 64
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    route_renormalize: bool = True  # renormalise the top-k weights to sum to 1
    # load balancing
    aux_loss_coef: float = 0.01  # Switch/GShard: E * sum_i f_i * P_i
    z_loss_coef: float = 1e-3  # mean(logsumexp(router logits)^2)
    bias_update_rate: float = 1e-3  # DeepSeek-V3 aux-loss-free selection bias (0 = off)
    init_std: float = 0.02
    # --- switches for open checkpoints (model/hf/); the defaults are our own model's layout
    attn_head_dim: int = 0  # 0: dim // n_heads
    qk_norm: str = "none"  # "none" | "head" (RMSNorm per head, Qwen3) | "full" (over all heads, OLMoE)
    attn_bias: bool = False  # biases on the q/k/v/o projections
    clip_qkv: float = 0.0  # clamp q, k, v to [-c, c] (OLMoE option; 0 = off)
    tie_embeddings: bool = True  # False: a separate output head
    rope_interleave: bool = False  # rotary pairs (x0, x1), (x2, x3)... (DeepSeek), permuted at load
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor", "original_max_position_embeddings", ...}
    attn_type: str = "gqa"  # "gqa" | "mla" (DeepSeek multi-head latent attention, compressed KV cache)
    q_lora_rank: int = 0  # MLA: 0 = a plain q projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_groups: int = 1  # group-limited routing: experts in n_groups groups, tokens use topk_groups of them
    topk_groups: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2) | "top2sum" (DeepSeek-V3)
    routed_scaling: float = 1.0  # routed expert weights are multiplied by this

    def __post_init__(self) -> None:
        checks = [
            (self.vocab_size > 0 and self.dim > 0 and self.n_layers > 0, "sizes must be positive"),
            (self.attn_head_dim > 0 or self.dim % self.n_heads == 0,
             f"dim {self.dim} is not divisible by n_heads {self.n_heads}"),
            (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
             f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"),
            (self.rope_dim % 2 == 0, "head dim must be even for RoPE"),
            (self.qk_norm in ("none", "head", "full"), f"qk_norm must be none, head or full, not {self.qk_norm!r}"),
            (self.attn_type in ("gqa", "mla"), f"attn_type must be gqa or mla, not {self.attn_type!r}"),
            (self.attn_type == "gqa" or min(self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim) > 0,
             "mla needs kv_lora_rank, qk_rope_head_dim and v_head_dim"),
            (self.n_groups >= 1 and self.n_experts % self.n_groups == 0 and 1 <= self.topk_groups <= self.n_groups,
             f"n_experts {self.n_experts} must split into n_groups {self.n_groups} (topk_groups {self.topk_groups})"),
            (self.group_score in ("max", "top2sum"), f"group_score must be max or top2sum, not {self.group_score!r}"),
            (0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers must be between 0 and n_layers"),
            (self.n_dense_layers == self.n_layers or 1 <= self.top_k <= self.n_experts,
             f"top_k {self.top_k} must be between 1 and n_experts {self.n_experts}"),
            (self.score_func in ("softmax", "sigmoid"), f"score_func must be softmax or sigmoid, not {self.score_func!r}"),
            (self.max_seq_len > 0, "max_seq_len must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid model config: {msg}")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dimensions per head that rotate (all of them, except MLA's decoupled rope part)."""
        return self.qk_rope_head_dim if self.attn_type == "mla" else self.head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError("model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # tests: trains in seconds on a CPU
    "tiny": ModelConfig(),
    # the shipped model: ~38.0M params total (~23.5M active); int8 export ~36.3 MiB
    "small": ModelConfig(
        vocab_size=16384, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=2048,
        n_dense_layers=1, dense_hidden=1024, n_experts=8, n_shared_experts=1, top_k=2, expert_hidden=224,
    ),
    # ~1.05B total (~0.3B active): one H100
    "base": ModelConfig(
        vocab_size=16384, dim=1536, n_layers=16, n_heads=12, n_kv_heads=4, max_seq_len=2048,
        rope_theta=50000.0, n_dense_layers=1, dense_hidden=4096, n_experts=16, n_shared_experts=1,
        top_k=2, expert_hidden=768,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset; ValueError naming the presets for an unknown one."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
    return dataclasses.replace(PRESETS[name])


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active-per-token) parameter counts. The output head is tied to the embedding."""
    D, hd = cfg.dim, cfg.head_dim
    attn = D * cfg.n_heads * hd * 2 + D * cfg.n_kv_heads * hd * 2
    norms = 2 * D
    dense = 3 * D * cfg.dense_hidden
    expert = 3 * D * cfg.expert_hidden
    shared = cfg.n_shared_experts * expert
    router = D * cfg.n_experts
    emb = cfg.vocab_size * D
    total = emb + D + cfg.n_layers * (attn + norms) + cfg.n_dense_layers * dense
    active = total
    total += cfg.n_moe_layers * (router + shared + cfg.n_experts * expert)
    active += cfg.n_moe_layers * (router + shared + cfg.top_k * expert)
    return total, active
