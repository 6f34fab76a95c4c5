"""Building blocks: RMSNorm, rotary embeddings, grouped-query attention with a KV cache, SwiGLU.

Shapes: B batch, T new tokens, L keys (cached + new), H query heads, G kv heads, Dh head dim.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).type_as(x)


def _rope(x_BHTD: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTD.float().chunk(2, dim=-1)
    cos, sin = cos_BTd[:, None], sin_BTd[:, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x_BHTD)


_POINTWISE = {"rms_norm": _rms_norm, "rope": _rope}


def compile_pointwise(enabled: bool = True, backend: str = "inductor") -> None:
    """Fuse RMSNorm and RoPE into one kernel each with ``torch.compile`` (process-wide).

    On a GPU a decode step at batch 1 is latency-bound: dozens of tiny kernels per layer,
    several of them the casts and multiplies of these two. Same math; off by default (the
    first calls compile).
    """
    if enabled:
        _POINTWISE["rms_norm"] = torch.compile(_rms_norm, dynamic=True, fullgraph=True, backend=backend)
        _POINTWISE["rope"] = torch.compile(_rope, dynamic=True, fullgraph=True, backend=backend)
    else:
        _POINTWISE.update(rms_norm=_rms_norm, rope=_rope)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            import kernels

            # inference on the Triton path: one kernel instead of upcast + norm + cast back
            # (an eager 8k prefill spent over a third of its GPU time on such casts, docs/benchmarks.md)
            if kernels.backend(x) == "triton":
                return kernels.add_rms_norm(x, None, self.weight, self.eps)[1]
        return _POINTWISE["rms_norm"](x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(dim: int, theta: float, s: dict, device) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv:2309.00071) inverse frequencies and cos/sin factor, as the DeepSeek and Qwen configs give them."""
    factor = float(s["factor"])
    orig = float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)
    att = s.get("attention_factor")
    if att is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        att = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)

    def corr(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(beta_fast), corr(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, float(att)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [max_len, head_dim // 2] (float32). ``scaling``: YaRN parameters."""
    att = 1.0
    if scaling and scaling.get("rope_type", "default") == "yarn":
        inv_freq, att = _yarn_inv_freq(head_dim, theta, scaling, device)
    else:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos() * att, angles.sin() * att


def apply_rope(x_BHTD: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (GPT-NeoX layout); cos/sin are [B or 1, T, Dh/2]."""
    if _rope_kernel_ok(x_BHTD):  # inference on a GPU: one kernel
        import kernels

        return kernels.rope(x_BHTD, cos_BTd, sin_BTd)
    return _POINTWISE["rope"](x_BHTD, cos_BTd, sin_BTd)


def _rope_kernel_ok(x_BHTD: torch.Tensor) -> bool:
    """Whether ``kernels.rope`` takes this rotation: inference, the Triton path, half a head a power of two."""
    if torch.is_grad_enabled() and x_BHTD.requires_grad:
        return False
    import kernels

    hd = x_BHTD.shape[-1] // 2
    return hd & (hd - 1) == 0 and kernels.backend(x_BHTD) == "triton"


class KVCache:
    """Preallocated keys/values per layer, [B, G, max_len, Dh], plus optional left padding.

    ``pad_lens[b]`` tokens at the start of row b are padding: they are hidden from every
    query and positions of that row count from its first real token.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32, v_head_dim: int | None = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        v_shape = (batch, n_kv_heads, max_len, v_head_dim or head_dim)  # MLA: latent and rope key differ
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(v_shape, device=device, dtype=dtype) for _ in range(n_layers)]
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

    def head(self, n: int) -> KVCache:
        """The first ``n`` rows, sharing this cache's storage (beam search runs on fewer rows as beams end)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[:n] for t in self.k], [t[:n] for t in self.v]
        view.batch, view.max_len = n, self.max_len
        view.pad_lens = None if self.pad_lens is None else self.pad_lens[:n]
        return view


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


def static_mask(pos: torch.Tensor, L: int, pad_lens: torch.Tensor | None) -> torch.Tensor:
    """Decode mask over a whole static cache of L slots for the query at slot ``pos`` (a [1] tensor)."""
    k = torch.arange(L, device=pos.device)
    mask = (k <= pos)[None, None, None, :]  # [1, 1, 1, L]
    if pad_lens is not None:
        mask = mask & ((k[None] >= pad_lens[:, None]) | (k == pos)[None])[:, None, None, :]
    return mask


def _write_cache(cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
                 start_pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store the new keys/values; returns the keys/values to attend to. A tensor ``start_pos``
    is a static decode step (CUDA graphs): the whole cache, with the mask hiding unused slots."""
    ck, cv = cache
    if isinstance(start_pos, torch.Tensor):
        ck.index_copy_(2, start_pos, k.to(ck.dtype))
        cv.index_copy_(2, start_pos, v.to(cv.dtype))
        return ck, cv
    T = k.shape[2]
    ck[:, :, start_pos:start_pos + T] = k
    cv[:, :, start_pos:start_pos + T] = v
    return ck[:, :, :start_pos + T], cv[:, :, :start_pos + T]


def _attend(q, k, v, T: int, mask, scale=None, gqa: bool = False) -> torch.Tensor:
    if mask is None:
        # Lq == Lk (no history) -> plain causal; T == 1 decode sees every cached key.
        causal = k.shape[2] == T and T > 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _plain_weights(*lins) -> bool:
    """Plain [out, in] weights with unit stride along ``in`` (not quantised modules)."""
    return all(isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.stride(1) == 1 for m in lins)


def _fuse_rows(owner: nn.Module, name: str, lins) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of ``lins`` stacked as one [sum(out), in] matrix, built once and
    cached on ``owner`` under ``name``; the Linears' parameters become views into it (no second copy)."""
    ptrs = tuple(lin.weight.data_ptr() for lin in lins)
    got = getattr(owner, name, None)
    if got is None or got[0] != ptrs:
        with torch.no_grad(), torch.inference_mode(False):
            w = torch.cat([lin.weight.detach() for lin in lins])
            has_b = [lin.bias is not None for lin in lins]
            b = None
            if any(has_b):
                b = torch.cat([lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
                               for lin in lins])  # fmt: skip
            n = 0
            for lin in lins:
                m = lin.weight.shape[0]
                lin.weight = nn.Parameter(w[n:n + m], requires_grad=lin.weight.requires_grad)
                if lin.bias is not None:
                    lin.bias = nn.Parameter(b[n:n + m], requires_grad=lin.bias.requires_grad)
                n += m
        setattr(owner, name, (tuple(lin.weight.data_ptr() for lin in lins), w, b))
    got = getattr(owner, name)
    return got[1], got[2]


def norm_gemv_wanted() -> bool:
    """MOECODER_NORM_GEMV=1|0 (default 1): at batch 1 the fused decode step runs each attention's
    input norm inside its first projection (``kernels.norm_linear``) and the output projection as
    the same GEMV kernel; 0 keeps the separate norm launch and torch's GEMVs (for A/B runs)."""
    import os

    v = os.environ.get("MOECODER_NORM_GEMV", "1").strip() or "1"
    if v not in ("0", "1"):
        raise ValueError(f"MOECODER_NORM_GEMV must be 0 or 1; got {v!r}")
    return v == "1"


def _out_proj(lin: nn.Module, y: torch.Tensor, B: int) -> torch.Tensor:
    """The output projection of one decode token: the GEMV kernel at batch 1 with plain weights."""
    if B == 1 and _plain_weights(lin):
        import kernels

        return kernels.norm_linear(y.reshape(1, -1), None, None, 0.0, lin.weight, lin.bias)[0].view(1, 1, -1)
    return lin(y.reshape(B, 1, -1))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        b = cfg.attn_bias
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=b)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=b)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=b)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=b)
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(cfg.n_heads * cfg.head_dim if full else cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.n_kv_heads * cfg.head_dim if full else cfg.head_dim, cfg.norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor = 0,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.wq(x_BTD), self.wk(x_BTD), self.wv(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = _write_cache(cache, k, v, start_pos)
            q = q.to(k.dtype)
        y = _attend(q, k, v, T, mask, gqa=self.n_heads != self.n_kv_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1).to(x_BTD.dtype))

    def fused_decode_ok(self) -> bool:
        """Whether :meth:`decode_fused` covers this configuration (plain weights, per-head or no
        QK-norm, no clipping, a power-of-two head dim)."""
        plain = all(isinstance(getattr(m, "weight", None), torch.Tensor) for m in (self.wq, self.wk, self.wv, self.wo))
        hd = self.head_dim
        return plain and self.qk_norm in ("head", "none") and not self.clip and hd >= 16 and hd & (hd - 1) == 0

    def _qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """wq, wk, wv as one [(H + 2G) * Dh, D] matrix: one GEMV per decode step instead of three.
        Built once; the three projections become views into it (no second copy)."""
        return _fuse_rows(self, "_qkv", (self.wq, self.wk, self.wv))

    def decode_fused(self, x_B1D: torch.Tensor | None, cos_Bd: torch.Tensor, sin_Bd: torch.Tensor, pos: torch.Tensor,
                     cache: tuple[torch.Tensor, torch.Tensor], pad: torch.Tensor | None, pre=None):
        """One decode token against the whole static cache (slot ``pos``, a [1] tensor): one QKV
        GEMV, one kernel for QK-norm + RoPE + cache write, one attention kernel, the output GEMV.

        ``pre=(h, delta, norm)`` (batch 1, instead of ``x_B1D``): the input is norm(h + delta), computed
        inside the QKV GEMV's launch; returns (output, h + delta) then."""
        import kernels

        w, b = self._qkv_weight()
        if pre is not None:
            hx, dx, nrm = pre
            B = hx.shape[0]
            qkv, h_new = kernels.norm_linear(hx, dx, nrm.weight, nrm.eps, w, b)
        else:
            B = x_B1D.shape[0]
            qkv = F.linear(x_B1D.reshape(B, -1), w, b)
        ck, cv = cache
        normed = self.qk_norm == "head"
        q = kernels.qk_rope_cache(qkv, self.q_norm.weight if normed else None, self.k_norm.weight if normed else None,
                                  cos_Bd, sin_Bd, ck, cv, pos, self.n_heads, self.n_kv_heads,
                                  self.q_norm.eps if normed else 0.0)
        y = kernels.decode_attention(q.to(ck.dtype), ck, cv, pos, pad)
        if pre is not None:
            return _out_proj(self.wo, y.to(hx.dtype), B), h_new.view(hx.shape)
        return self.wo(y.reshape(B, 1, -1).to(x_B1D.dtype))

    def norm_gemv_ok(self) -> bool:
        """Whether ``decode_fused(pre=...)`` applies: plain weights (the QKV matrix is built from them)."""
        return _plain_weights(self.wq, self.wk, self.wv, self.wo)


def _rope_in_place(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate ``x`` in place by the Triton kernel when it applies (inference, Triton path); False otherwise."""
    if x_BHTD.stride(-1) != 1 or not _rope_kernel_ok(x_BHTD):
        return False
    import kernels

    kernels.rope(x_BHTD, cos, sin, out=x_BHTD)
    return True


def _mla_keys_kernel_ok(kv: torch.Tensor) -> bool:
    """Whether MLA's prefill keys come from ``kernels.mla_keys`` (inference on the Triton path)."""
    import kernels

    if torch.is_grad_enabled() or os.environ.get("MOECODER_MLA_KEYS", "1") == "0":
        return False
    return kv.stride(-1) == 1 and kernels.backend(kv) == "triton"


def linear_weight(lin: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a Linear or of a weight-only quantised linear (dequantised)."""
    w = getattr(lin, "weight", None)
    return w if isinstance(w, torch.Tensor) else lin.dequantize()


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention. The cache holds the compressed latent
    ``c`` [B, 1, L, kv_lora_rank] (as ``k``) and the shared rotary key [B, 1, L, rope] (as ``v``).

    Prefill expands the latent into per-head keys and values; a decode step (T == 1) absorbs
    the key/value up-projections into the query and output instead (attention in the latent
    space, reading only the compressed cache).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D, b = cfg.n_heads, cfg.dim, cfg.attn_bias
        self.n_heads, self.dn, self.dr, self.dv, self.r = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, \
            cfg.v_head_dim, cfg.kv_lora_rank
        qd = self.dn + self.dr
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=b)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * qd, bias=False)
        else:
            self.wq = nn.Linear(D, H * qd, bias=False)
        self.wkv_a = nn.Linear(D, self.r + self.dr, bias=b)
        self.kv_a_norm = RMSNorm(self.r, 1e-6)
        self.wkv_b = nn.Linear(self.r, H * (self.dn + self.dv), bias=False)
        self.wo = nn.Linear(H * self.dv, D, bias=b)
        self.scale = qd ** -0.5
        s = cfg.rope_scaling or {}
        if s.get("rope_type", "default") != "default" and s.get("mscale_all_dim"):
            m = yarn_mscale(float(s["factor"]), float(s["mscale_all_dim"]))
            self.scale *= m * m

    def forward(self, x_BTD, cos, sin, start_pos=0, cache=None, mask=None):
        B, T, _ = x_BTD.shape
        H, dn, dr, dv, r = self.n_heads, self.dn, self.dr, self.dv, self.r
        q = self.wq_b(self.q_a_norm(self.wq_a(x_BTD))) if hasattr(self, "wq_a") else self.wq(x_BTD)
        q = q.view(B, T, H, dn + dr).transpose(1, 2)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        c, k_pe = self.wkv_a(x_BTD).split([r, dr], dim=-1)
        c = self.kv_a_norm(c).view(B, 1, T, r)
        q_rot = _rope_in_place(q_pe, cos, sin)  # inference on a GPU: q's rotary part rotated where it is
        if not q_rot:
            q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.view(B, 1, T, dr), cos, sin)
        if cache is not None:
            c, k_pe = _write_cache(cache, c, k_pe, start_pos)
        L = c.shape[2]
        w = linear_weight(self.wkv_b).view(H, dn + dv, r)
        if T == 1 and cache is not None:  # absorbed: attention over the latent cache
            q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope.to(w.dtype), w[:, :dn])
            qq = torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1).to(c.dtype)
            kk = torch.cat([c, k_pe], dim=-1)
            o = _attend(qq, kk, c, T, mask, scale=self.scale, gqa=True)
            y = torch.einsum("bhtr,hvr->bhtv", o.to(w.dtype), w[:, dn:])
        else:
            import kernels

            kv = self.wkv_b(c[:, 0].to(x_BTD.dtype)).view(B, L, H, dn + dv)
            # keys [B, L, H, dn + dr]: one kernel in inference on a GPU, broadcast + cat (differentiable) otherwise
            keys = kernels.mla_keys if _mla_keys_kernel_ok(kv) else kernels.reference.mla_keys
            k = keys(kv, k_pe[:, 0], dn).transpose(1, 2)
            v = kv.transpose(1, 2)[..., dn:]
            qq = (q if q_rot else torch.cat([q_nope, q_pe], dim=-1)).to(k.dtype)  # no copy when rotated in place
            y = _attend(qq, k, v, T, mask, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * dv).to(x_BTD.dtype))

    def fused_decode_ok(self) -> bool:
        dims = (self.r, self.dr)
        return all(d >= 16 and d & (d - 1) == 0 for d in dims)

    def _in_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The projections of the block input (wq or wq_a, then wkv_a) as one matrix: one GEMV."""
        return _fuse_rows(self, "_qa_kva", (self.wq_a if hasattr(self, "wq_a") else self.wq, self.wkv_a))

    def norm_gemv_ok(self) -> bool:
        first = self.wq_a if hasattr(self, "wq_a") else self.wq
        return _plain_weights(first, self.wkv_a, self.wo)

    def decode_fused(self, x_B1D, cos_Bd, sin_Bd, pos, cache, pad, pre=None):
        """One decode token, absorbed attention over the latent cache by one kernel (no
        concatenated copy of the cache, no mask). ``pre=(h, delta, norm)`` as ``Attention.decode_fused``:
        the input norm and both input projections in one GEMV launch; returns (output, h + delta)."""
        import kernels

        H, dn, dr, dv, r = self.n_heads, self.dn, self.dr, self.dv, self.r
        if pre is not None:
            hx, dx, nrm = pre
            B = hx.shape[0]
            w_in, b_in = self._in_weight()
            qa, h_new = kernels.norm_linear(hx, dx, nrm.weight, nrm.eps, w_in, b_in)
            nq = (self.wq_a if hasattr(self, "wq_a") else self.wq).weight.shape[0]
            q, ckv = qa[:, :nq], qa[:, nq:]
            if hasattr(self, "wq_a"):
                q = self.wq_b(self.q_a_norm(q))
            dtype = hx.dtype
        else:
            B = x_B1D.shape[0]
            x = x_B1D.reshape(B, -1)
            q = self.wq_b(self.q_a_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)  # [B, H*(dn+dr)]
            ckv = self.wkv_a(x)
            dtype = x_B1D.dtype
        ck, cpe = cache
        # one kernel: latent norm + rotary key into the caches, the queries' rotary parts rotated
        q_pe = kernels.mla_rope_cache(q, ckv, self.kv_a_norm.weight, self.kv_a_norm.eps, cos_Bd, sin_Bd,
                                      ck, cpe, pos, H, dn)  # fmt: skip
        w = linear_weight(self.wkv_b).view(H, dn + dv, r)
        q_lat = torch.einsum("bhd,hdr->bhr", q.view(B, H, dn + dr)[:, :, :dn].to(w.dtype), w[:, :dn])
        o = kernels.decode_attention(q_lat.to(ck.dtype), ck, ck, pos, pad, self.scale, k2_BGLD=cpe,
                                     q2_BHD=q_pe.to(ck.dtype))  # fmt: skip
        y = torch.einsum("bhr,hvr->bhv", o.to(w.dtype), w[:, dn:])
        if pre is not None:
            return _out_proj(self.wo, y.to(dtype), B), h_new.view(hx.shape)
        return self.wo(y.reshape(B, 1, H * dv).to(dtype))


class SwiGLU(nn.Module):
    """Dense feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and os.environ.get("MOECODER_SWIGLU_KERNEL", "1") != "0":
            import kernels

            if kernels.backend(x) == "triton":  # inference on a GPU: silu and the product in one kernel
                return self.w2(kernels.swiglu(self.w1(x), self.w3(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
