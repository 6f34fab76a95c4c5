"""Which SDPA backend an MLA prefill gets and what it costs: q/k head dim 192, v 128 (DeepSeek-V2-Lite,
16 heads) against v zero-padded to 192 (then sliced), causal, bf16, one GPU.

    python scripts/sdpa_mla.py [T ...]
"""

import functools
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ts = []
    for _ in range(n):
        ev[0].record()
        fn()
        ev[1].record()
        torch.cuda.synchronize()
        ts.append(ev[0].elapsed_time(ev[1]))
    return sorted(ts)[n // 2]


def attend(q, k, v, backend, pad: bool):
    val = F.pad(v, (0, q.shape[-1] - v.shape[-1])) if pad else v
    if backend is None:
        return F.scaled_dot_product_attention(q, k, val, is_causal=True)[..., : v.shape[-1]]
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, val, is_causal=True)[..., : v.shape[-1]]


def main():
    print(torch.__version__, torch.cuda.get_device_name())
    for T in [int(a) for a in sys.argv[1:]] or [2048, 8192]:
        q, k = (torch.randn(1, T, 16, 192, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        v = torch.randn(1, T, 16, 256, device="cuda", dtype=torch.bfloat16).transpose(1, 2)[..., :128]
        ref = attend(q, k, v, SDPBackend.EFFICIENT_ATTENTION, False).float()
        for name, be in BACKENDS.items():
            for pad in (False, True):
                tag = f"{name} {'v padded' if pad else 'v128'}"
                try:
                    ms = timed(functools.partial(attend, q, k, v, be, pad))
                    err = (attend(q, k, v, be, pad).float() - ref).abs().max().item()
                    print(f"T={T} {tag:>18}: {ms:7.3f} ms  max|diff| vs efficient {err:.4f}", flush=True)
                except RuntimeError as e:  # a backend that refuses these shapes
                    print(f"T={T} {tag:>18}: not available ({str(e).splitlines()[0][:90]})", flush=True)


if __name__ == "__main__":
    main()
