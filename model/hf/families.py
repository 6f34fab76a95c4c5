"""Open MoE families: a Hugging Face ``config.json`` -> our ``ModelConfig``, and checkpoint
tensor names -> our parameter names.

Each family is a handful of config switches on our own Transformer (``model.config``):

    Qwen3MoeForCausalLM      GQA + per-head QK-norm, softmax router (renormalised if
                             norm_topk_prob), no shared expert
    MixtralForCausalLM       GQA, softmax router renormalised over the top-k
    OlmoeForCausalLM         GQA + QK-norm over all heads (+ optional clip_qkv), softmax router
    DeepseekV2ForCausalLM    MLA with the compressed KV cache, shared experts, first-k dense
                             layers, softmax router (greedy or group-limited), routed scaling
    DeepseekV3ForCausalLM    as V2, sigmoid router + selection bias, group-limited (top-2 sum)

Anything else (another architecture, an activation other than SiLU, an unknown RoPE type,
interleaved dense/MoE layers, FP8 weights...) is an ``HFError`` naming it: never a silent
approximation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from model.config import ModelConfig

DEFAULT_MAX_CONTEXT = 32768  # RoPE tables and the engine's budget; `moecoder serve --context` sets it


class HFError(ValueError):
    """A checkpoint directory moecoder cannot load; the message is one line."""


ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


@dataclass
class Family:
    name: str  # qwen3_moe | mixtral | olmoe | deepseek_v2 | deepseek_v3
    architecture: str
    config: ModelConfig
    rope_perm: bool  # MLA rotary dims are stored interleaved: permute them to halves at load


def _get(hf: dict, *names, default=None):
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    return default


def _rope(hf: dict, arch: str) -> tuple[float, dict | None]:
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if rtype == "default":
        return theta, None
    if rtype != "yarn":
        raise HFError(f"{arch}: unsupported RoPE scaling {rtype!r} (supported: default, yarn)")
    if "factor" not in params or "original_max_position_embeddings" not in params:
        raise HFError(f"{arch}: yarn RoPE scaling without factor / original_max_position_embeddings")
    keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
            "attention_factor", "truncate")
    return theta, {"rope_type": "yarn", **{k: params[k] for k in keep if params.get(k) is not None}}


def _require(cond: bool, arch: str, what: str) -> None:
    if not cond:
        raise HFError(f"{arch}: unsupported option {what}")


def family_from_config(hf: dict, max_context: int | None = None) -> Family:
    """Our config for a Hugging Face ``config.json`` (already parsed)."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise HFError("config.json has no \"architectures\" entry (not a Hugging Face checkpoint?)")
    arch = str(archs[0])
    name = ARCHITECTURES.get(arch)
    if name is None:
        raise HFError(f"unsupported architecture {arch} (supported: {', '.join(ARCHITECTURES)})")
    act = hf.get("hidden_act", "silu")
    _require(act in ("silu", "swish"), arch, f"hidden_act={act!r} (only silu)")
    q = hf.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise HFError(f"{arch}: quantised checkpoint ({method}) is not supported; use bf16/fp32 weights")
    theta, scaling = _rope(hf, arch)
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    limit = int(_get(hf, "max_position_embeddings", default=4096))
    sliding = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if sliding:  # within the window sliding attention is plain causal attention: cap the context there
        limit = min(limit, int(sliding))
    ctx = min(limit, max_context or DEFAULT_MAX_CONTEXT)
    kw: dict = dict(
        vocab_size=int(hf["vocab_size"]), dim=D, n_layers=int(hf["num_hidden_layers"]), n_heads=H,
        n_kv_heads=int(_get(hf, "num_key_value_heads", default=H)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=ctx, norm_eps=float(_get(hf, "rms_norm_eps", default=1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        aux_loss_coef=0.0, z_loss_coef=0.0, bias_update_rate=0.0, n_shared_experts=0,
        attn_bias=bool(hf.get("attention_bias", False)),
    )
    head_dim = _get(hf, "head_dim")
    rope_perm = False
    if name in ("qwen3_moe", "mixtral", "olmoe"):
        hd = int(head_dim) if head_dim else D // H
        kw.update(attn_head_dim=hd if hd * H != D else 0, top_k=int(hf["num_experts_per_tok"]),
                  n_experts=int(_get(hf, "num_experts", "num_local_experts")), n_dense_layers=0)
        if name == "qwen3_moe":
            _require(int(hf.get("decoder_sparse_step", 1)) == 1 and not hf.get("mlp_only_layers"), arch,
                     "decoder_sparse_step/mlp_only_layers (dense layers between MoE layers)")
            kw.update(qk_norm="head", expert_hidden=int(hf["moe_intermediate_size"]),
                      dense_hidden=int(hf.get("intermediate_size") or hf["moe_intermediate_size"]),
                      route_renormalize=bool(hf.get("norm_topk_prob", False)))
        elif name == "mixtral":
            _require(not hf.get("router_jitter_noise"), arch, "router_jitter_noise")
            kw.update(expert_hidden=int(hf["intermediate_size"]), dense_hidden=int(hf["intermediate_size"]),
                      route_renormalize=True)
        else:
            kw.update(qk_norm="full", clip_qkv=float(hf.get("clip_qkv") or 0.0),
                      expert_hidden=int(hf["intermediate_size"]), dense_hidden=int(hf["intermediate_size"]),
                      route_renormalize=bool(hf.get("norm_topk_prob", False)))
    else:  # DeepSeek V2 / V3
        _require(int(hf.get("moe_layer_freq", 1)) == 1, arch, f"moe_layer_freq={hf.get('moe_layer_freq')}")
        _require(not hf.get("mlp_bias"), arch, "mlp_bias")
        v3 = name == "deepseek_v3"
        method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
        score = hf.get("scoring_func", "sigmoid" if v3 else "softmax")
        ok = {"deepseek_v2": {"greedy", "group_limited_greedy"}, "deepseek_v3": {"noaux_tc"}}[name]
        _require(method in ok, arch, f"topk_method={method!r}")
        _require(score == ("sigmoid" if v3 else "softmax"), arch, f"scoring_func={score!r}")
        E = int(_get(hf, "n_routed_experts", "num_local_experts"))
        groups = int(hf.get("n_group") or 1) if (v3 or method == "group_limited_greedy") else 1
        topk_groups = int(hf.get("topk_group") or groups) if groups > 1 else 1
        dn, dr = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
        kw.update(
            attn_type="mla", attn_head_dim=dn + dr, n_kv_heads=H, q_lora_rank=int(hf.get("q_lora_rank") or 0),
            kv_lora_rank=int(hf["kv_lora_rank"]), qk_nope_head_dim=dn, qk_rope_head_dim=dr,
            v_head_dim=int(hf["v_head_dim"]), n_experts=E, top_k=int(hf["num_experts_per_tok"]),
            expert_hidden=int(hf["moe_intermediate_size"]), dense_hidden=int(hf["intermediate_size"]),
            n_shared_experts=int(hf.get("n_shared_experts") or 0),
            n_dense_layers=min(int(hf.get("first_k_dense_replace") or 0), int(hf["num_hidden_layers"])),
            score_func=score, route_renormalize=bool(hf.get("norm_topk_prob", False)),
            routed_scaling=float(hf.get("routed_scaling_factor") or 1.0), n_groups=groups,
            topk_groups=topk_groups, group_score="top2sum" if v3 else "max",
            bias_update_rate=1e-3 if v3 else 0.0,  # V3 carries the selection bias (never updated here)
            rope_interleave=bool(hf.get("rope_interleave", True)),
        )
        rope_perm = kw["rope_interleave"]
        # DeepSeek-V3's multi-token-prediction layers (num_nextn_predict_layers) are skipped at load
    try:
        cfg = ModelConfig(**kw)
    except (TypeError, ValueError) as e:
        raise HFError(f"{arch}: {str(e).splitlines()[0]}") from None
    return Family(name, arch, cfg, rope_perm)


# --------------------------------------------------------------------------- tensor names
@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: our parameter ``name``; ``expert`` index (stacked
    experts) or None; ``transpose`` (HF [out, in] -> our [in, out] expert layout); ``split``
    (0/1: first/second half of a fused gate_up tensor along dim -2, or None)."""

    name: str
    expert: int | None = None
    transpose: bool = False
    split: int | None = None
    fused: bool = False  # the tensor holds every expert [E, ...]


_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
_ATTN = {
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_norm": "q_norm", "k_norm": "k_norm",
    "q_a_proj": "wq_a", "q_a_layernorm": "q_a_norm", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_a_norm", "kv_b_proj": "wkv_b",
}
_DENSE = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_EXPERT = {"gate_proj": "w_gate", "w1": "w_gate", "up_proj": "w_up", "w3": "w_up", "down_proj": "w_down",
           "w2": "w_down"}


def map_name(name: str, cfg: ModelConfig) -> list[Target] | None:
    """Our targets for checkpoint tensor ``name``; [] to skip it knowingly; None if unknown."""
    if name in ("model.embed_tokens.weight", "embed_tokens.weight"):
        return [Target("tok_emb.weight")]
    if name in ("model.norm.weight", "norm.weight"):
        return [Target("norm.weight")]
    if name == "lm_head.weight":
        return [] if cfg.tie_embeddings else [Target("output.weight")]
    m = _LAYER.match(name)
    if not m:
        return [] if name.endswith("rotary_emb.inv_freq") else None
    i, rest = int(m.group(1)), m.group(2)
    if i >= cfg.n_layers:
        return []  # e.g. DeepSeek-V3 multi-token-prediction layers
    p = f"layers.{i}"
    if rest == "input_layernorm.weight":
        return [Target(f"{p}.attn_norm.weight")]
    if rest == "post_attention_layernorm.weight":
        return [Target(f"{p}.ffn_norm.weight")]
    parts = rest.split(".")
    if parts[0] == "self_attn" and len(parts) == 3 and parts[1] in _ATTN:
        return [Target(f"{p}.attn.{_ATTN[parts[1]]}.{parts[2]}")]
    if parts[0] == "self_attn" and parts[-1] == "inv_freq":
        return []
    if parts[0] not in ("mlp", "block_sparse_moe"):
        return None
    moe = i >= cfg.n_dense_layers
    sub = parts[1:]
    if not moe:
        if len(sub) == 2 and sub[0] in _DENSE and sub[1] == "weight":
            return [Target(f"{p}.ffn.{_DENSE[sub[0]]}.weight")]
        return None
    f = f"{p}.ffn"
    if sub == ["gate", "weight"]:
        return [Target(f"{f}.gate.weight")]
    if sub == ["gate", "e_score_correction_bias"] or sub == ["e_score_correction_bias"]:
        return [Target(f"{f}.expert_bias")]
    if sub[0] == "shared_experts" and len(sub) == 3 and sub[1] in _DENSE and sub[2] == "weight":
        return [Target(f"{f}.shared.{_DENSE[sub[1]]}.weight")]
    if sub[0] == "experts":
        if len(sub) == 4 and sub[1].isdigit() and sub[2] in _EXPERT and sub[3] == "weight":
            return [Target(f"{f}.experts.{_EXPERT[sub[2]]}", expert=int(sub[1]), transpose=True)]
        if sub[1:] == ["gate_up_proj"]:  # transformers 5 in-memory layout [E, 2F, D]
            return [Target(f"{f}.experts.w_gate", transpose=True, split=0, fused=True),
                    Target(f"{f}.experts.w_up", transpose=True, split=1, fused=True)]
        if sub[1:] == ["down_proj"]:  # [E, D, F]
            return [Target(f"{f}.experts.w_down", transpose=True, fused=True)]
    return None


def rope_permutation(dim: int):
    """Row order that turns interleaved rotary pairs (x0, x1), (x2, x3)... into halves
    (x0, x2, ...; x1, x3, ...), which our rotate-half RoPE expects."""
    import torch

    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])


def permute_rope_rows(target: str, t, cfg: ModelConfig):
    """Apply :func:`rope_permutation` to the rotary rows of MLA's q and kv_a projections."""
    dn, dr, H = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.n_heads
    perm = rope_permutation(dr)
    if target.endswith((".attn.wq.weight", ".attn.wq_b.weight")):
        rows = t.view(H, dn + dr, -1)
        return torch_cat(rows[:, :dn], rows[:, dn:][:, perm]).reshape(t.shape)
    if target.endswith(".attn.wkv_a.weight") or target.endswith(".attn.wkv_a.bias"):
        r = cfg.kv_lora_rank
        return torch_cat(t[:r], t[r:][perm], dim=0)
    return t


def torch_cat(a, b, dim: int = 1):
    import torch

    return torch.cat([a, b], dim=dim)
