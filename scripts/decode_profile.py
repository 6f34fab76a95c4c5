"""Where does a decode step of an open MoE config spend its time? (issue #12, GPU)

    python scripts/decode_profile.py [--configs qwen3-30b-a3b,deepseek-v2-lite] [--layers 4,8]

Builds our Transformer for a full-width Qwen3-30B-A3B / DeepSeek-V2-Lite config with only
``--layers`` layers (random bf16 weights made on the device; per-layer cost is what matters),
fills a static cache with a 128-token prompt, and for each layer count:
  - times one CUDA-graph-replayed decode step at batch 1 (median of 50 replays; the slope
    between two layer counts is the cost of one layer, the intercept the embedding + head);
  - profiles eager decode steps with torch.profiler (CUDA activities): kernels per layer and
    the top kernels by device time per step.
``--pdl 0,1`` times the MoE layer op without and with programmatic dependent launch.
``--fused`` also times ``Transformer.decode_static`` with the fused decode path off/on (env
MOECODER_FUSED_DECODE=0/1) where it exists.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def build(name: str, layers: int, dev, max_len: int):
    from model.hf.families import family_from_config
    from model.hf.loader import empty_model
    from model.hf_bench import CONFIGS

    hf = dict(CONFIGS[name])
    hf["num_hidden_layers"] = layers
    if hf.get("first_k_dense_replace"):
        hf["first_k_dense_replace"] = min(hf["first_k_dense_replace"], layers - 1)
    fam = family_from_config(hf, max_context=max_len)
    model, _ = empty_model(fam, dev, "bf16" if dev.type == "cuda" else "fp32")
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def _decoder(model, dev, ctx: int, max_len: int):
    """The product's decoder (model/static_decode.py) at batch 1 with a ``ctx``-token prompt in its cache."""
    from model.static_decode import StaticDecoder

    dec = StaticDecoder(model, 1, max_len, False, dev, graph=dev.type == "cuda")
    V = model.cfg.vocab_size
    x = torch.randint(0, V, (1, ctx), device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    tok = model(x, 0, dec.cache, last_only=True)[:, -1].argmax(-1)
    for _ in range(3):  # the first graph step captures
        dec.step(model, tok, ctx)
    _sync(dev)
    return dec, tok


def graph_step_ms(model, dev, ctx: int, max_len: int, reps: int = 50) -> float:
    """Wall time of one decode step (median of ``reps``), always at position ``ctx``."""
    dec, tok = _decoder(model, dev, ctx, max_len)
    times = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        dec.step(model, tok, ctx)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def graph_step_events_ms(model, dev, ctx: int, max_len: int, inner: int = 20, reps: int = 10) -> float:
    """Device time of one graph-replayed step, from CUDA events around ``inner`` back-to-back steps."""
    dec, tok = _decoder(model, dev, ctx, max_len)
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            dec.step(model, tok, ctx)
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / inner)
    return statistics.median(out)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def profile_eager(model, dev, ctx: int, max_len: int, steps: int = 3, top: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    cache = model.setup_cache(1, max_len, device=dev)
    V = model.cfg.vocab_size
    x = torch.randint(0, V, (1, ctx), device=dev, generator=torch.Generator(device=dev).manual_seed(1))
    model(x, 0, cache, last_only=True)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    pos = torch.tensor([ctx], device=dev)
    for _ in range(2):
        model.decode_static(tok, pos, cache)
    _sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            model.decode_static(tok, pos, cache)
        _sync(dev)
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    n_layers = model.cfg.n_layers
    total_us = sum(e.device_time for e in evs) / steps if dev.type == "cuda" else 0.0
    print(f"  eager: {len(evs) / steps:.0f} kernels per step ({len(evs) / steps / n_layers:.1f} per layer), "
          f"sum of kernel times {total_us:.0f} us per step", flush=True)
    agg: dict[str, list[float]] = {}
    for e in evs:
        agg.setdefault(e.name, []).append(e.device_time)
    rows = sorted(agg.items(), key=lambda kv: -sum(kv[1]))[:top]
    print(f"  {'kernel':70s} {'per step':>9s} {'us/step':>9s} {'us each':>8s}")
    for name, ts in rows:
        print(f"  {name[:70]:70s} {len(ts) / steps:9.1f} {sum(ts) / steps:9.1f} {statistics.mean(ts):8.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="qwen3-30b-a3b,deepseek-v2-lite")
    p.add_argument("--layers", default="4,8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ctx", type=int, default=144)
    p.add_argument("--max-len", type=int, default=152)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--fused", action="store_true", help="also time MOECODER_FUSED_DECODE=0/1")
    p.add_argument("--router-warps", default="auto",
                   help="comma-separated MOECODER_ROUTER_WARPS values to time (e.g. auto,1)")
    p.add_argument("--pdl", default=os.environ.get("MOECODER_PDL", "0"),
                   help="comma-separated MOECODER_PDL values to time (e.g. 0,1: the layer op's launches "
                        "without / with programmatic dependent launch)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    print(torch.__version__, torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", flush=True)
    fused = ["0", "1"] if args.fused else [os.environ.get("MOECODER_FUSED_DECODE", "")]
    modes = [(f, rw, pdl) for f in fused for rw in args.router_warps.split(",") for pdl in args.pdl.split(",")]
    for name in args.configs.split(","):
        res = {}
        for nl in [int(x) for x in args.layers.split(",")]:
            model = build(name, nl, dev, args.max_len)
            with torch.inference_mode():
                for mode in modes:
                    if mode[0]:
                        os.environ["MOECODER_FUSED_DECODE"] = mode[0]
                    os.environ["MOECODER_ROUTER_WARPS"] = mode[1]
                    os.environ["MOECODER_PDL"] = mode[2]
                    tag = f"{name} layers={nl} fused={mode[0] or '-'} router_warps={mode[1]} pdl={mode[2]}"
                    if dev.type == "cuda":
                        ms = graph_step_events_ms(model, dev, args.ctx, args.max_len)
                        res[(nl, mode)] = ms
                        print(f"{tag}: graph step {ms:.3f} ms", flush=True)
                    if not args.no_profile and nl == max(int(x) for x in args.layers.split(",")):
                        print(f"{tag}: eager profile", flush=True)
                        profile_eager(model, dev, args.ctx, args.max_len)
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        ls = sorted({k[0] for k in res})
        for mode in modes:
            if len(ls) >= 2 and (ls[0], mode) in res:
                a, b = res[(ls[0], mode)], res[(ls[-1], mode)]
                per = (b - a) / (ls[-1] - ls[0])
                print(f"{name} fused={mode[0] or '-'} router_warps={mode[1]} pdl={mode[2]}: {per * 1e3:.1f} us per layer, "
                      f"intercept {(a - per * ls[0]) * 1e3:.0f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
