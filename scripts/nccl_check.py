"""The NCCL path of training on the GPUs a machine has (#14), under torchrun.

    torchrun --standalone --nproc-per-node N scripts/nccl_check.py [--preset small] [--ep E]
        [--steps 30] [--batch 16] [--seq 1024] [--json OUT]

What it does, in order, on every rank:
1. Process group ``cpu:gloo,cuda:nccl``; each rank on ``cuda:(LOCAL_RANK % visible GPUs)``, so
   ``--nproc-per-node 2`` on a one-GPU machine tries two ranks on one device. An all-reduce
   and an uneven ``all_to_all_single`` over NCCL (the expert-parallel exchange) are checked
   against their expected values; a refusal by NCCL is reported in one line and the script
   stops there (exit 3).
2. The preset, FSDP2 (+ expert parallelism with ``--ep``) through ``model.parallel.parallelize``
   with bf16 parameters / fp32 gradient reduction, AdamW, ``--steps`` steps on a fixed random
   token stream (global batch ``--batch`` rows, each rank its block of rows), timed after two
   warm-up steps: tokens/s, MFU against 989 TFLOP/s x world, peak memory per GPU, and the GPU
   time in NCCL kernels (all-to-all, all-gather, reduce-scatter) from ``torch.profiler`` over
   three steps.
3. On rank 0, with ``--compare``: the same steps on one plain (not distributed) model from the
   same initial weights and the same global batches; the per-step losses of both are printed
   side by side (the "N GPUs vs 1 GPU" loss curve).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.bench import flops_per_token  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.transformer import Transformer  # noqa: E402

PEAK = 989e12


def _batches(cfg, steps: int, batch: int, seq: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a learnable stream: repeated random snippets, so the loss falls visibly in a few steps
    base = torch.randint(0, cfg.vocab_size, (64, seq + 1), generator=g)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, base.shape[0], (batch,), generator=g)
        out.append(base[idx])
    return out


def _reset_mem(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(model, batches, rows: slice, device, steps_timed_from: int = 2, profile_steps: int = 0,
           reduce_loss: bool = True):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    losses, times, nccl_ms, prof = [], [], None, None
    for i, b in enumerate(batches):
        x = b[rows, :-1].to(device)
        y = b[rows, 1:].to(device)
        _sync(device)
        t0 = time.perf_counter()
        if profile_steps and i == len(batches) - profile_steps:
            acts = [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [torch.profiler.ProfilerActivity.CPU]
            prof = torch.profiler.profile(activities=acts)
            prof.__enter__()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if reduce_loss and dist.is_initialized():
            lt = loss.detach().clone()
            dist.all_reduce(lt)
            losses.append(lt.item() / dist.get_world_size())
        else:
            losses.append(loss.item())
        if prof is not None and i == len(batches) - 1:
            prof.__exit__(None, None, None)
            kinds: dict[str, float] = {}
            for ev in prof.key_averages():
                name = ev.key.lower()
                if "nccl" in name or "gloo" in name or name.startswith("c10d::"):
                    us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
                    kinds[ev.key[:60]] = kinds.get(ev.key[:60], 0.0) + us / 1000.0 / profile_steps
            nccl_ms = kinds
    timed = times[steps_timed_from:]
    return losses, sum(timed) / max(1, len(timed)), nccl_ms


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="global rows per step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--compare", action="store_true")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rank, world, local = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    ngpu = torch.cuda.device_count()
    try:
        if ngpu:
            device = torch.device("cuda", local % ngpu)
            torch.cuda.set_device(device)
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        else:  # a CPU smoke test of this script (gloo)
            device = torch.device("cpu")
            dist.init_process_group("gloo")
    except Exception as e:
        msg = str(e).strip().splitlines()
        print(f"rank {rank}: process group init failed: {(msg[0] if msg else type(e).__name__)[:300]}", flush=True)
        os._exit(3)
    res: dict = {"world": world, "gpus_visible": ngpu, "preset": a.preset, "ep": a.ep, "torch": torch.__version__,
                 "nccl": ".".join(map(str, torch.cuda.nccl.version())) if ngpu else None,
           "gpu": torch.cuda.get_device_name(device) if ngpu else "cpu"}
    # 1. the collectives the training and EP paths use
    try:
        t = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(t)
        ok_ar = bool(torch.allclose(t, torch.full_like(t, world * (world + 1) / 2)))
        # uneven all_to_all: rank r sends (j + 1) rows to rank j, each row filled with r
        send_splits = [j + 1 for j in range(world)]
        recv_splits = [rank + 1] * world
        inp = torch.full((sum(send_splits), 8), float(rank), device=device)
        out = torch.empty((sum(recv_splits), 8), device=device)
        dist.all_to_all_single(out, inp, recv_splits, send_splits)
        _sync(device)
        expect = torch.cat([torch.full((rank + 1, 8), float(j), device=device) for j in range(world)])
        ok_a2a = bool(torch.equal(out, expect))
        res["collectives"] = {"all_reduce": ok_ar, "all_to_all_uneven": ok_a2a}
    except Exception as e:  # NCCL refuses e.g. two ranks on one GPU
        msg = str(e).strip().splitlines()
        res["collectives"] = {"error": (msg[0] if msg else type(e).__name__)[:300]}
        if rank == 0:
            print(json.dumps(res, indent=1))
            if a.json:
                Path(a.json).write_text(json.dumps(res, indent=1))
        os._exit(3)
    # 2. FSDP2 (+EP) training steps
    from model import parallel

    cfg = get_preset(a.preset)
    cfg.max_seq_len = max(cfg.max_seq_len, a.seq)
    torch.manual_seed(0)
    ref_state = {k: v.clone() for k, v in Transformer(cfg).state_dict().items()}
    model = Transformer(cfg)
    model.load_state_dict(ref_state)
    model.to(device)
    dims = parallel.ParallelDims(1, -1, a.ep)
    parallel.parallelize(model, dims, device.type, param_dtype=torch.bfloat16 if device.type == "cuda" else None)
    batches = _batches(cfg, a.steps, a.batch, a.seq)
    b = a.batch // world
    _reset_mem(device)
    losses, step_s, nccl = _train(model, batches, slice(rank * b, (rank + 1) * b), device, profile_steps=3)
    tok_s = a.batch * a.seq / step_s
    res.update(step_s=step_s, tok_s=tok_s, mfu=tok_s * flops_per_token(cfg, a.seq) / (PEAK * world),
               peak_mem_gib=_peak_gib(device), nccl_ms_per_step=nccl, losses=losses)
    mems = [None] * world
    dist.all_gather_object(mems, res["peak_mem_gib"])
    res["peak_mem_gib_per_rank"] = mems
    # 3. the one-GPU twin from the same weights and batches
    if a.compare and rank == 0:
        plain = Transformer(cfg)
        plain.load_state_dict(ref_state)
        plain.to(device)
        # the plain model trains under bf16 autocast with fp32 parameters (the one-GPU recipe)
        _reset_mem(device)
        plosses, pstep, _ = _train(plain, batches, slice(0, a.batch), device, reduce_loss=False)
        res.update(one_gpu_tok_s=a.batch * a.seq / pstep, one_gpu_losses=plosses,
                   one_gpu_peak_mem_gib=_peak_gib(device))
    dist.barrier()
    if rank == 0:
        print(f"world {world} preset {a.preset} ep {a.ep}: {res['tok_s']:,.0f} tok/s, MFU {res['mfu']:.1%}, "
              f"peak {res['peak_mem_gib']:.1f} GiB/GPU, step {step_s * 1000:.1f} ms, nccl ms/step {nccl}")
        if "one_gpu_losses" in res:
            print("step  loss(world)  loss(one plain GPU)")
            for i, (l1, l2) in enumerate(zip(res["losses"], res["one_gpu_losses"])):
                if i % 5 == 0 or i == len(res["losses"]) - 1:
                    print(f"{i:4d}  {l1:10.4f}  {l2:10.4f}")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skip process-group teardown: gloo can abort in its static destructors at exit


if __name__ == "__main__":
    sys.exit(main())
