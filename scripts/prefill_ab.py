"""A/B of the prefill switches in one process: logits and GPU time of an inference forward with each
switch off vs on (8 layers of the full-size shapes, random bf16 weights, the head at the last position).

    PYTHONPATH=$PWD python scripts/prefill_ab.py [MODELS] [T] [SWITCH,...]

Switches (environment, read at each call): MOECODER_FUSED_NORMS (residual adds inside the norms),
MOECODER_MLA_KEYS (MLA keys in one pass), MOECODER_SWIGLU_KERNEL (silu * up in one kernel),
MOECODER_ROUTER_KERNEL (router logits from bf16); a third argument names others instead (e.g. MOECODER_TMA:
the grouped GEMMs' weights through TMA descriptors), the switches it leaves out at their defaults.
"off" = all named switches 0; each row turns one on, the last all.
"""

import os
import sys

import torch

from model.hf_bench import CONFIGS, random_moecoder

SWITCHES = ("MOECODER_FUSED_NORMS", "MOECODER_MLA_KEYS", "MOECODER_SWIGLU_KERNEL", "MOECODER_ROUTER_KERNEL")


def setting(on: set[str], switches=SWITCHES) -> None:
    for s in switches:
        os.environ[s] = "1" if s in on else "0"


def gpu_ms(fn, reps: int = 7) -> float:
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[reps // 2]


def main() -> None:
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CONFIGS)
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    switches = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else SWITCHES
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)} | torch {torch.__version__} | T={T}", flush=True)
    for name in names:
        model = random_moecoder(name, dev, layers=8)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 1000, (1, T), generator=g).to(dev)
        check = torch.randint(0, 1000, (2, 128), generator=g).to(dev)
        rows = (
            [("off", set())]
            + [(s.removeprefix("MOECODER_").lower(), {s}) for s in switches]
            + ([("all", set(switches))] if len(switches) > 1 else [])
        )
        base = None
        with torch.inference_mode():
            for label, on in rows:
                setting(on, switches)
                for _ in range(2):
                    model(x, last_only=True)
                ms = gpu_ms(lambda m=model, x=x: m(x, last_only=True))
                lg = model(check).float()
                if base is None:
                    base, base_ms = lg, ms
                d = (lg - base).abs()
                top1 = float((lg.argmax(-1) == base.argmax(-1)).float().mean())
                print(
                    f"{name:18s} {label:16s} {ms:7.2f} ms ({base_ms / ms:.3f}x off)  logits vs off: max {float(d.max()):.4f} "
                    f"mean {float(d.mean()):.5f} top-1 {top1:.3f}",
                    flush=True,
                )
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
