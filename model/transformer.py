"""The MoE transformer: embedding -> n_dense_layers dense blocks -> MoE blocks -> RMSNorm -> tied head.

Pre-norm residual blocks, grouped-query attention with rotary embeddings and an optional
preallocated KV cache. ``forward`` returns float32 logits; ``aux_loss()`` the weighted balance
and z losses of the last forward (train.py adds it to the LM loss); ``last_stats`` plain numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import (
    Attention,
    KVCache,
    MLAttention,
    RMSNorm,
    SwiGLU,
    attention_mask,
    rope_tables,
    static_mask,
)
from model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLAttention(cfg) if cfg.attn_type == "mla" else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: nn.Module = MoE(cfg) if moe else SwiGLU(cfg.dim, cfg.dense_hidden)

    def forward(self, x, cos, sin, start_pos=0, cache=None, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, start_pos, cache, mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # open checkpoints usually have an output head of their own; ours is tied to the embedding
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    # ----------------------------------------------------------------- init
    def reset_buffers(self, device=None) -> None:
        """(Re)compute the RoPE tables, e.g. after ``to_empty`` from the meta device."""
        device = device if device is not None else self.tok_emb.weight.device
        cos, sin = rope_tables(self.cfg.rope_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device,
                               self.cfg.rope_scaling)
        self.rope_cos, self.rope_sin = cos, sin

    @torch.no_grad()
    def init_weights(self, buffer_device=None) -> None:
        """Embedding and projections N(0, 0.02); residual outputs scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        if self.tok_emb.weight.device.type != "meta":
            self.reset_buffers(buffer_device)
        nn.init.normal_(self.tok_emb.weight, std=std)
        for block in self.layers:
            for norm in block.modules():
                if isinstance(norm, RMSNorm):
                    norm.reset_parameters()
            for name, lin in block.attn.named_children():
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, std=out_std if name == "wo" else std)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
            if isinstance(block.ffn, MoE):
                block.ffn.reset_parameters(std, out_std)
            ffn = block.ffn.shared if isinstance(block.ffn, MoE) else block.ffn
            if ffn is not None:
                nn.init.normal_(ffn.w1.weight, std=std)
                nn.init.normal_(ffn.w3.weight, std=std)
                nn.init.normal_(ffn.w2.weight, std=out_std)
        self.norm.reset_parameters()
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    # ----------------------------------------------------------------- forward
    def setup_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the context length {self.cfg.max_seq_len}")
        device = device if device is not None else self.tok_emb.weight.device
        dtype = dtype if dtype is not None else self.tok_emb.weight.dtype
        if self.cfg.attn_type == "mla":  # compressed: the latent and the shared rotary key
            return KVCache(self.cfg.n_layers, batch, 1, max_len, self.cfg.kv_lora_rank, device, dtype,
                           v_head_dim=self.cfg.qk_rope_head_dim)
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, device, dtype)

    def head_weight(self) -> torch.Tensor:
        from model.layers import linear_weight

        return self.tok_emb.weight if self.output is None else linear_weight(self.output)

    def forward(self, tokens_BT: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                last_only: bool = False, last_index: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """Logits [B, T, V] (float32); ``last_only`` computes the head for the last position only,
        ``last_index`` (a [1] long tensor) for that position only ([B, 1, V]; no host sync: a
        right-padded prompt in a captured prefill, model/static_decode.py). ``head=False``: the
        head's input instead (the final norm's output [B, T, D]; assistant/memory.py keys on it)."""
        B, T = tokens_BT.shape
        end = start_pos + T
        limit = cache.max_len if cache is not None else self.cfg.max_seq_len
        if end > limit:
            raise ValueError(f"sequence end {end} exceeds the {'cache' if cache else 'context'} length {limit}")
        pad = cache.pad_lens if cache is not None else None
        if pad is None:
            cos, sin = self.rope_cos[None, start_pos:end], self.rope_sin[None, start_pos:end]
        else:  # per-row positions: a row's first real token is position 0
            pos = (torch.arange(start_pos, end, device=tokens_BT.device)[None] - pad[:, None]).clamp_min(0)
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        mask = None
        if cache is not None and (pad is not None or (start_pos > 0 and T > 1)):
            mask = attention_mask(start_pos, T, pad, tokens_BT.device)
        h = self.tok_emb(tokens_BT)
        if self._fused_norms(h):
            return self._forward_fused_norms(h, cos, sin, start_pos, cache, mask, last_only, last_index, head)
        for i, block in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            h = block(h, cos, sin, start_pos, kv, mask)
        if last_index is not None:
            h = h.index_select(1, last_index)
        elif last_only:
            h = h[:, -1:]
        if not head:
            return self.norm(h)
        return F.linear(self.norm(h), self.head_weight()).float()

    def _fused_norms(self, h: torch.Tensor) -> bool:
        """Inference on the Triton path (a GPU): ``forward`` runs each residual add inside the next
        RMSNorm's kernel (``kernels.add_rms_norm``), the shared experts' output included, instead of
        separate add kernels (an 8k prefill spends ~3 adds of [T, D] per layer otherwise; issue #12);
        the last add, on the rows the head reads, stays separate so that the final norm is the module.
        MOECODER_FUSED_NORMS=0 turns it off (A/B runs)."""
        import os

        import kernels

        if torch.is_grad_enabled() or os.environ.get("MOECODER_FUSED_NORMS", "1") == "0":
            return False
        if kernels.backend(h) != "triton" or type(self.norm) is not RMSNorm:
            return False
        return all(type(b) is Block and type(b.attn_norm) is RMSNorm and type(b.ffn_norm) is RMSNorm for b in self.layers)

    def _forward_fused_norms(self, h, cos, sin, start_pos, cache, mask, last_only, last_index, head):
        """``forward``'s blocks with the residual adds fused into the norms (same rounding points)."""
        import kernels

        f = f2 = None  # the last feed-forward's output: routed experts and shared experts, not yet added
        for i, block in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            h, xn = kernels.add_rms_norm(h, f, block.attn_norm.weight, block.attn_norm.eps, f2)
            a = block.attn(xn, cos, sin, start_pos, kv, mask)
            h, xn = kernels.add_rms_norm(h, a, block.ffn_norm.weight, block.ffn_norm.eps)
            f, f2 = block.ffn.forward_parts(xn) if type(block.ffn) is MoE else (block.ffn(xn), None)

        def rows(t):
            if t is None:
                return None
            if last_index is not None:
                return t.index_select(1, last_index)
            return t[:, -1:] if last_only else t

        h = rows(h)
        if f is not None:  # the last add as the eager path rounds it; the final norm runs as the module, so
            d = rows(f) if f2 is None else rows(f) + rows(f2)  # its hooks (the memory's head input) fire
            h = h + d.to(h.dtype)
        xn = self.norm(h)
        if not head:
            return xn
        return F.linear(xn, self.head_weight()).float()

    def decode_static(self, tokens_B1: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step at slot ``pos`` (a [1] long tensor) attending over the whole
        preallocated cache: no host sync and fixed shapes, so it can be captured in a CUDA
        graph (gpt-fast style). Same logits as ``forward(tokens, int(pos), cache)``.
        Takes the fused step (:meth:`_decode_fused`) where :meth:`fused_decode` says so."""
        if self.fused_decode(tokens_B1):
            return self._decode_fused(tokens_B1, pos, cache)
        pad = cache.pad_lens
        if pad is None:
            cos, sin = self.rope_cos[pos][None], self.rope_sin[pos][None]
        else:
            p = (pos[None, :] - pad[:, None]).clamp_min(0)
            cos, sin = self.rope_cos[p], self.rope_sin[p]
        mask = static_mask(pos, cache.max_len, pad)
        h = self.tok_emb(tokens_B1)
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, pos, (cache.k[i], cache.v[i]), mask)
        return F.linear(self.norm(h), self.head_weight()).float()

    def prepare_static(self) -> None:
        """Build now what the fused decode step would build on its first call (one QKV matrix that
        wq/wk/wv become views of): a CUDA graph captured earlier, e.g. a prefill's, would otherwise
        keep reading the projections' freed storage (model/static_decode.py calls this first)."""
        for b in self.layers:
            if hasattr(b.attn, "_qkv_weight") and b.attn.fused_decode_ok():
                b.attn._qkv_weight()
            if hasattr(b.attn, "_in_weight") and b.attn.fused_decode_ok() and b.attn.norm_gemv_ok():
                b.attn._in_weight()

    def norm_gemv(self) -> bool:
        """Whether the batch-1 fused step takes ``kernels.norm_linear`` (``layers.norm_gemv_wanted``;
        plain attention weights in every layer)."""
        from model.layers import norm_gemv_wanted

        return norm_gemv_wanted() and len(self.layers) > 0 and all(b.attn.norm_gemv_ok() for b in self.layers)

    def fused_decode(self, tokens: torch.Tensor) -> bool:
        """MOECODER_FUSED_DECODE=auto|1|0: the fused static decode step. auto: on where the
        kernels take their Triton path (CUDA); 1 forces it (the reference ops on CPU, for tests)."""
        import os

        import kernels

        mode = os.environ.get("MOECODER_FUSED_DECODE", "auto").strip().lower() or "auto"
        if mode not in ("auto", "1", "0"):
            raise ValueError(f"MOECODER_FUSED_DECODE must be one of auto, 1, 0; got {mode!r}")
        if mode == "0" or (mode == "auto" and kernels.backend(tokens) != "triton"):
            return False
        return all(b.attn.fused_decode_ok() for b in self.layers)

    def _decode_fused(self, tokens_B1: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        import kernels

        pad = cache.pad_lens
        if pad is None:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # [1, d]
        else:
            p = (pos[None, :] - pad[:, None]).clamp_min(0)[:, 0]
            cos, sin = self.rope_cos[p], self.rope_sin[p]  # [B, d]
        h = self.tok_emb(tokens_B1)
        if tokens_B1.shape[0] == 1 and self.norm_gemv():  # each attention's input norm inside its QKV GEMV
            f = None
            for i, block in enumerate(self.layers):
                a, h = block.attn.decode_fused(None, cos, sin, pos, (cache.k[i], cache.v[i]), pad,
                                               pre=(h, f, block.attn_norm))  # fmt: skip
                h, xn = kernels.add_rms_norm(h, a, block.ffn_norm.weight, block.ffn_norm.eps)
                f = block.ffn(xn)
            _, xn = kernels.add_rms_norm(h, f, self.norm.weight, self.norm.eps)
            return F.linear(xn, self.head_weight()).float()
        first = self.layers[0].attn_norm if len(self.layers) else self.norm
        _, xn = kernels.add_rms_norm(h, None, first.weight, first.eps)
        for i, block in enumerate(self.layers):
            a = block.attn.decode_fused(xn, cos, sin, pos, (cache.k[i], cache.v[i]), pad)
            h, xn = kernels.add_rms_norm(h, a, block.ffn_norm.weight, block.ffn_norm.eps)
            f = block.ffn(xn)
            nxt = self.layers[i + 1].attn_norm if i + 1 < len(self.layers) else self.norm
            h, xn = kernels.add_rms_norm(h, f, nxt.weight, nxt.eps)
        return F.linear(xn, self.head_weight()).float()

    # ----------------------------------------------------------------- MoE bookkeeping
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def aux_loss(self) -> torch.Tensor:
        """Summed weighted balance + z losses of the last forward (a zero tensor if disabled)."""
        total = self.tok_emb.weight.new_zeros((), dtype=torch.float32)
        for moe in self.moe_layers():
            total = total + moe.aux_loss()
        return total

    def expert_counts(self) -> torch.Tensor:
        """Tokens per expert accumulated over training forwards since the last bias update: [n_moe, E]."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0)
        return torch.stack([m.counts_acc for m in layers])

    @torch.no_grad()
    def update_bias(self, counts_LE: torch.Tensor | None = None, rate: float | None = None) -> None:
        """DeepSeek-V3 aux-loss-free balancing step; call once per optimizer step.

        ``counts_LE`` defaults to ``expert_counts()`` (all-reduce it first when data parallel).
        Resets the accumulated counts.
        """
        rate = self.cfg.bias_update_rate if rate is None else rate
        layers = self.moe_layers()
        counts = self.expert_counts() if counts_LE is None else counts_LE
        for moe, c in zip(layers, counts):
            if rate > 0:
                moe.update_bias(c, rate)
            moe.counts_acc.zero_()

    @property
    def last_stats(self) -> dict:
        """MoE statistics of the last forward as plain numbers (syncs with the device)."""
        per_layer, imbalance, balance, z = [], [], [], []
        for moe in self.moe_layers():
            if "counts" not in moe.last:
                continue
            counts = moe.last["counts"]
            per_layer.append([int(c) for c in counts.tolist()])
            imbalance.append(float(counts.max() / counts.mean().clamp_min(1e-9)))
            if "balance_loss" in moe.last:
                balance.append(float(moe.last["balance_loss"].detach()))
                z.append(float(moe.last["z_loss"].detach()))
        return {
            "tokens_per_expert": per_layer,
            "imbalance": imbalance,  # max / mean tokens per expert, per MoE layer
            "max_imbalance": max(imbalance, default=0.0),
            "balance_loss": sum(balance) / len(balance) if balance else 0.0,
            "z_loss": sum(z) / len(z) if z else 0.0,
            "expert_bias": [m.expert_bias.tolist() for m in self.moe_layers()],
        }
