"""Building blocks: RMSNorm, rotary embeddings, grouped-query attention with a KV cache, SwiGLU.

Shapes: B batch, T new tokens, L keys (cached + new), H query heads, G kv heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [max_len, head_dim // 2] (float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BHTD: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (GPT-NeoX layout); cos/sin are [B or 1, T, Dh/2]."""
    x1, x2 = x_BHTD.float().chunk(2, dim=-1)
    cos, sin = cos_BTd[:, None], sin_BTd[:, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x_BHTD)


class KVCache:
    """Preallocated keys/values per layer, [B, G, max_len, Dh], plus optional left padding.

    ``pad_lens[b]`` tokens at the start of row b are padding: they are hidden from every
    query and positions of that row count from its first real token.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch, self.max_len = batch, max_len
        self.pad_lens: torch.Tensor | None = None

    def set_padding(self, pad_lens: list[int] | torch.Tensor | None) -> None:
        if pad_lens is None:
            self.pad_lens = None
            return
        pad = torch.as_tensor(pad_lens, dtype=torch.long, device=self.k[0].device)
        if pad.shape != (self.batch,):
            raise ValueError(f"pad_lens must have {self.batch} entries")
        self.pad_lens = pad if bool((pad > 0).any()) else None


def attention_mask(start_pos: int, T: int, pad_lens: torch.Tensor | None, device) -> torch.Tensor | None:
    """Bool mask [B or 1, 1, T, start_pos + T] (True = attend), or None for plain causal.

    Query i sits at absolute slot ``start_pos + i`` and may see keys at slots <= its own
    (bottom-right aligned causal mask). Padding keys are hidden, except a query's own slot
    so a padding row never has an empty softmax.
    """
    L = start_pos + T
    q = torch.arange(start_pos, L, device=device)[:, None]
    k = torch.arange(L, device=device)[None, :]
    mask = (k <= q)[None, None]  # [1, 1, T, L]
    if pad_lens is not None:
        real = k[None] >= pad_lens[:, None, None]  # [B, 1, L]
        mask = mask & (real[:, None] | (k == q)[None, None])
    return mask


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            ck, cv = cache
            ck[:, :, start_pos:start_pos + T] = k
            cv[:, :, start_pos:start_pos + T] = v
            k, v = ck[:, :, :start_pos + T], cv[:, :, :start_pos + T]
            q = q.to(k.dtype)
        gqa = self.n_heads != self.n_kv_heads
        if mask is None:
            # Lq == Lk (no history) -> plain causal; T == 1 decode sees every cached key.
            causal = k.shape[2] == T and T > 1
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1).to(x_BTD.dtype))


class SwiGLU(nn.Module):
    """Dense feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
