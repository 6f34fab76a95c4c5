"""Model benchmark: ``python -m model.bench``.

CPU (default): prefill and decode tokens/s at batch 1 and batch 8 for the ``tiny`` and
``small`` presets (random weights, float32, greedy decoding through the KV cache, the same
calls ``model.generate`` makes), plus the latency of a short completion (prompt + 16 tokens).

CUDA (``--device cuda``): training tokens/s and MFU for ``small`` and ``base``: forward +
backward + AdamW step under bf16 autocast; MFU against the H100's 989 TFLOP/s dense bf16
peak with 6 * active params + 12 * layers * dim * seq FLOPs per token (as train.py logs it).

Prints the machine, versions and date with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.config import PRESETS, get_preset, param_counts
from model.transformer import Transformer

H100_BF16_PEAK = 989e12


def flops_per_token(cfg, seq_len: int) -> float:
    _, active = param_counts(cfg)
    return 6.0 * active + 12.0 * cfg.n_layers * cfg.dim * seq_len


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [
        f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC} | {platform.platform()} | python {platform.python_version()}",
        f"torch {torch.__version__} | cpu {cpu} x{os.cpu_count()} | torch threads {torch.get_num_threads()} "
        f"| load average {' '.join(f'{x:.2f}' if isinstance(x, float) else x for x in load)}",
    ]
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.version.cuda} | {torch.cuda.get_device_name()}")
    return "\n".join(lines)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def bench_inference(model: Transformer, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                    device="cpu") -> dict:
    """Best of ``repeats``: prefill tokens/s, decode tokens/s (all rows), and the total time."""
    V = model.cfg.vocab_size
    best = None
    for r in range(repeats + 1):  # the first run warms up
        x = torch.randint(0, V, (batch, prompt_len), device=device)
        cache = model.setup_cache(batch, prompt_len + new_tokens, device=device)
        _sync(device)
        t0 = time.perf_counter()
        logits = model(x, 0, cache, last_only=True)
        nxt = logits[:, -1].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        for i in range(new_tokens - 1):
            nxt = model(nxt[:, None], prompt_len + i, cache)[:, -1].argmax(-1)
        nxt.tolist()
        t2 = time.perf_counter()
        if r == 0:
            continue
        res = {"prefill_s": t1 - t0, "decode_s": t2 - t1}
        if best is None or res["prefill_s"] + res["decode_s"] < best["prefill_s"] + best["decode_s"]:
            best = res
    best["prefill_tok_s"] = batch * prompt_len / best["prefill_s"]
    best["decode_tok_s"] = batch * (new_tokens - 1) / best["decode_s"]
    best["ms_per_step"] = 1000 * best["decode_s"] / (new_tokens - 1)
    return best


def bench_train(cfg, batch: int, seq_len: int, steps: int, device: str, compile_model: bool) -> dict:
    """Training step (fwd + bwd + AdamW) under bf16 autocast: tokens/s and MFU."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(device).train()
    cuda = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    run = torch.compile(model) if compile_model else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    inp, tgt = x[:, :-1], x[:, 1:]

    def step():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=cuda):
            logits = run(inp)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)) + model.aux_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_bias()

    for _ in range(3):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    tok_s = batch * seq_len / dt
    res = {"step_s": dt, "tok_s": tok_s, "tflops": tok_s * flops_per_token(cfg, seq_len) / 1e12}
    res["mfu"] = res["tflops"] * 1e12 / H100_BF16_PEAK
    if cuda:
        res["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (inference numbers) or cuda (training numbers)")
    p.add_argument("--presets", default=None, help="comma-separated (default: tiny,small on cpu; small,base on cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill length (default 128 tiny, 512 others)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-batch", default=None, help="cuda: rows per step per preset, e.g. small=32,base=8")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="cuda: torch.compile the model")
    p.add_argument("--model", default=None, metavar="DIR|shipped",
                   help="cpu: time a released model instead of presets: load time, resident memory, "
                        "prefill/decode tokens/s ('shipped' = model/weights/)")
    return p


def _rss_mib() -> float:
    """Resident memory of this process now (Linux /proc), MiB; NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bench_released(model_dir, batches: list[int], args, err) -> int:
    """Load time, resident memory and batch-N speed of released weights (the shipped model by default)."""
    from model.checkpoint import CheckpointError, load_model

    rss0 = _rss_mib()
    t0 = time.perf_counter()
    try:
        loaded = load_model(model_dir)
    except CheckpointError as e:
        return err(str(e))
    load_s = time.perf_counter() - t0
    rss1 = _rss_mib()
    cfg = loaded.config
    total, active = param_counts(cfg)
    print(f"model {model_dir or 'model/weights (shipped)'}: {total / 1e6:.1f}M params ({active / 1e6:.1f}M active), "
          f"context {cfg.max_seq_len}")
    print(f"load {load_s:.2f} s (safetensors + checks + int8 dequantisation); resident memory {rss1:.0f} MiB "
          f"(+{rss1 - rss0:.0f} MiB for the model, after torch import)")
    plen = min(args.prompt_len or 512, cfg.max_seq_len - args.new_tokens)
    print(f"\ninference, float32, greedy, {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"{'batch':>6}{'prompt':>7}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>9}")
    for b in batches:
        r = bench_inference(loaded.model, b, plen, args.new_tokens, args.repeats)
        print(f"{b:>6}{plen:>7}{r['prefill_tok_s']:>15,.0f}{r['decode_tok_s']:>14,.1f}{r['ms_per_step']:>9.1f}",
              flush=True)
    print(f"resident memory after the runs: {_rss_mib():.0f} MiB")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    err = lambda msg: print(f"model.bench: error: {msg}", file=sys.stderr) or 2  # noqa: E731
    cuda = args.device.startswith("cuda")
    if args.device != "cpu" and not cuda:
        return err(f"unknown device {args.device!r} (cpu or cuda)")
    if cuda and not torch.cuda.is_available():
        return err("CUDA is not available on this machine")
    names = (args.presets or ("small,base" if cuda else "tiny,small")).split(",")
    for n in names:
        if n not in PRESETS:
            return err(f"unknown model preset {n!r} (choose from {', '.join(PRESETS)})")
    try:
        batches = [int(b) for b in args.batches.split(",")]
        train_batch = {"tiny": 64, "small": 32, "base": 8}
        for item in filter(None, (args.train_batch or "").split(",")):
            k, v = item.split("=")
            train_batch[k] = int(v)
    except ValueError:
        return err("--batches / --train-batch must be integers (e.g. 1,8 / small=32,base=8)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(machine())
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"\ntraining step (fwd+bwd+AdamW, bf16 autocast), seq {args.seq_len}, {args.steps} timed steps,"
              f" MFU vs {H100_BF16_PEAK / 1e12:.0f} TFLOP/s")
        print(f"{'preset':<8}{'params':>16}{'batch':>7}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'mem GiB':>9}")
        for n in names:
            cfg = get_preset(n)
            total, active = param_counts(cfg)
            seq = min(args.seq_len, cfg.max_seq_len)
            r = bench_train(cfg, train_batch.get(n, 8), seq, args.steps, args.device, args.compile)
            print(f"{n:<8}{f'{total / 1e6:.0f}M/{active / 1e6:.0f}M':>16}{train_batch.get(n, 8):>7}"
                  f"{r['tok_s']:>12,.0f}{r['tflops']:>9.1f}{r['mfu']:>7.1%}{r.get('max_mem_gib', 0):>9.1f}",
                  flush=True)
        return 0
    if args.model is not None:
        return bench_released(None if args.model == "shipped" else args.model, batches, args, err)
    print(f"\ninference, float32, greedy, {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"{'preset':<8}{'params':>14}{'batch':>6}{'prompt':>7}{'prefill tok/s':>15}{'decode tok/s':>14}"
          f"{'ms/step':>9}{'total s':>9}")
    for n in names:
        cfg = get_preset(n)
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        total, active = param_counts(cfg)
        plen = args.prompt_len or (128 if n == "tiny" else 512)
        plen = min(plen, cfg.max_seq_len - args.new_tokens)
        for b in batches:
            r = bench_inference(model, b, plen, args.new_tokens, args.repeats)
            print(f"{n:<8}{f'{total / 1e6:.1f}M/{active / 1e6:.1f}M':>14}{b:>6}{plen:>7}{r['prefill_tok_s']:>15,.0f}"
                  f"{r['decode_tok_s']:>14,.1f}{r['ms_per_step']:>9.1f}{r['prefill_s'] + r['decode_s']:>9.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
