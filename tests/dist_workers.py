"""Worker programs for the distributed tests, launched with torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def _init() -> tuple[int, int]:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _finish() -> None:
    """Tear down together: no rank closes its gloo connections while a peer still uses them
    (a rank tearing down early made its peer abort with "terminate called" in one CI run)."""
    dist.barrier()
    dist.destroy_process_group()


def _ep_inputs(rank: int, T: int, D: int, E: int, starve: list[int]):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    logits[:, starve] = -1e9  # these experts receive no tokens from anyone
    return x, logits


def _ep_case(rank: int, world: int, starve: list[int]) -> dict:
    import kernels
    from kernels.reference import moe_experts
    from model.parallel import ep_moe_experts

    T, D, F, E, K = 7 + rank, 8, 6, 4 * world, 2
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(E, D, F, generator=g, dtype=torch.float64),
         torch.randn(E, D, F, generator=g, dtype=torch.float64),
         torch.randn(E, F, D, generator=g, dtype=torch.float64)]
    n = E // world
    local = [p[rank * n:(rank + 1) * n].clone().requires_grad_(True) for p in w]
    x, logits = _ep_inputs(rank, T, D, E, starve)
    x.requires_grad_(True)
    weights, experts = kernels.route(logits, K)
    weights = weights.double().requires_grad_(True)
    y = ep_moe_experts(x, weights, experts, *local, group=None)
    (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).cos()).sum().backward()

    # reference on one process: every rank's tokens through the full weights
    full = [p.clone().requires_grad_(True) for p in w]
    errs = {"y": 0.0, "dx": 0.0, "dweights": 0.0, "dw": 0.0}
    for r in range(world):
        xr, lr = _ep_inputs(r, 7 + r, D, E, starve)
        xr.requires_grad_(True)
        wr, er = kernels.route(lr, K)
        wr = wr.double().requires_grad_(True)
        yr = moe_experts(xr, wr, er, *full)
        (yr * torch.arange(yr.numel(), dtype=yr.dtype).reshape(yr.shape).cos()).sum().backward()
        if r == rank:
            errs["y"] = (yr - y).abs().max().item()
            errs["dx"] = (xr.grad - x.grad).abs().max().item()
            errs["dweights"] = (wr.grad - weights.grad).abs().max().item()
    for p_full, p_local in zip(full, local):
        # a rank whose experts got no rows still has (zero) gradients: FSDP reduces them
        errs["dw"] = max(errs["dw"], (p_full.grad[rank * n:(rank + 1) * n] - p_local.grad).abs().max().item())
    errs["empty_expert_grad"] = max(full[0].grad[e].abs().max().item() for e in starve)
    return errs


def ep_layer(out_path: str) -> None:
    """EP forward/backward of the routed experts equals the single-process reference:
    with one starved expert, and with every expert of the last rank starved (it receives no rows)."""
    rank, world = _init()
    n = 4
    cases = {"one_expert_empty": [4 * world - 1], "rank_empty": list(range((world - 1) * n, world * n))}
    res = {name: _ep_case(rank, world, starve) for name, starve in cases.items()}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(res, f)
    _finish()


def _tiny_cfg(**kw):
    import dataclasses

    from model.config import get_preset

    # aux balance loss off: E * sum f_i P_i of a shard is not the shard-mean of the global one
    return dataclasses.replace(get_preset("tiny"), aux_loss_coef=0.0, **kw)


def _step(model, opt, tokens, clip_fn=None):
    import torch.nn.functional as F

    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) + model.aux_loss()
    loss.backward()
    if clip_fn is not None:
        clip_fn(model.parameters())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def fsdp_steps(out_path: str, replicate: str, shard: str, ep: str, steps: str = "3") -> None:
    """K steps of FSDP2/HSDP (+EP) equal K steps of one process on the global batch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from model.parallel import ParallelDims, all_reduce_expert_counts, clip_grad_norm_, parallelize
    from model.transformer import Transformer

    rank, world = _init()
    torch.set_default_dtype(torch.float64)  # so that reduction order is far below the tolerance
    cfg = _tiny_cfg(n_experts=4)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg)
    parallelize(model, ParallelDims(int(replicate), int(shard), int(ep)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    per_rank = 2
    g = torch.Generator().manual_seed(1)
    norms: list[tuple[float, float]] = []
    # clipping at 0.5 is active (the norms are > 1): the sharded total norm must be the global one

    def clip(params):
        norms.append((float(clip_grad_norm_(params, 0.5)), 0.0))

    def ref_clip(params):
        norms[-1] = (norms[-1][0], float(torch.nn.utils.clip_grad_norm_(params, 0.5)))

    for _ in range(int(steps)):
        batch = torch.randint(0, cfg.vocab_size, (per_rank * world, 17), generator=g)
        _step(model, opt, batch[rank * per_rank:(rank + 1) * per_rank], clip)
        all_reduce_expert_counts(model)
        model.update_bias()
        _step(ref, ref_opt, batch, ref_clip)
        ref.update_bias()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    err = 0.0
    for name, want in ref.state_dict().items():
        got = full[name]  # expert weights come back whole too (DTensors over the EP mesh)
        e1 = (got.float() - want.float()).abs().max().item()
        err = max(err, e1)
    moved = max((p - q).abs().max().item() for p, q in zip(ref.state_dict().values(), Transformer(cfg).state_dict().values()))
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"max_err": err, "ref_moved": moved, "norms": norms}, f)
    _finish()


def _full_states(model, opt) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    flat = {f"model.{k}": v.detach().clone() for k, v in msd.items()}
    for pname, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                flat[f"optim.{pname}.{k}"] = v.detach().clone()
    return flat


def _train_some(model, opt, cfg, steps: int, seed: int, rank: int, world: int) -> float:
    from model.parallel import all_reduce_expert_counts

    g = torch.Generator().manual_seed(seed)
    per_rank = 4 // world if 4 % world == 0 else 1
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = torch.randint(0, cfg.vocab_size, (max(per_rank * world, 4), 17), generator=g)
        loss = _step(model, opt, batch[rank * per_rank:(rank + 1) * per_rank])
        all_reduce_expert_counts(model)
        model.update_bias()
    return float(loss)


def dcp_roundtrip(mode: str, ckpt: str, ref_path: str, replicate: str, shard: str, ep: str) -> None:
    """mode=save: train 2 steps sharded, save with DCP; mode=load: load on another layout,
    compare model + optimizer state with the saved one, then train on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from model.parallel import ParallelDims, parallelize
    from model.transformer import Transformer

    rank, world = _init()
    cfg = _tiny_cfg(n_experts=4)
    torch.manual_seed(0)
    model = Transformer(cfg)
    parallelize(model, ParallelDims(int(replicate), int(shard), int(ep)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if mode == "save":
        _train_some(model, opt, cfg, 2, seed=1, rank=rank, world=world)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        full = _full_states(model, opt)
        if rank == 0:
            torch.save(full, ref_path)
    else:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        full = _full_states(model, opt)
        ref = torch.load(ref_path)
        assert set(ref) == set(full), sorted(set(ref) ^ set(full))[:5]
        err = max((ref[k].double() - full[k].double()).abs().max().item() for k in ref)
        before = full["model.tok_emb.weight"]
        loss = _train_some(model, opt, cfg, 1, seed=2, rank=rank, world=world)
        after = _full_states(model, opt)["model.tok_emb.weight"]
        with open(f"{ref_path}.load{world}.{rank}", "w") as f:
            json.dump({"max_err": err, "n_keys": len(ref), "loss": loss,
                       "moved": (after - before).abs().max().item()}, f)
    _finish()


def ep_generate(out_path: str, small_t: str, tok_path: str) -> None:
    """Greedy generation through the batch scheduler with the routed experts sharded over the
    world (rank 0 drives, the others follow) equals one unsharded process, token for token."""
    import copy
    import random
    import time

    from model.batching import BatchScheduler, BatchState, follow
    from model.generate import SamplingParams, generate
    from model.parallel import ServeDist, plan_channel, shard_experts_for_inference
    from model.tokenizer import Tokenizer
    from model.transformer import Transformer

    rank, world = _init()
    tok = Tokenizer.load(tok_path)
    cfg = _tiny_cfg(vocab_size=tok.vocab_size, max_seq_len=48, init_std=0.3, n_experts=4,
                   n_layers=3, bias_update_rate=0.001)
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    n = cfg.n_experts // world
    with torch.no_grad():  # the last rank's experts are never chosen in the first MoE layer
        model.moe_layers()[0].expert_bias[cfg.n_experts - n:] = -1e4
    ref = copy.deepcopy(model)
    shard_experts_for_inference(model, small_t=int(small_t))
    send, receive = plan_channel(ServeDist(rank, world))
    rng = random.Random(0)
    prompts = [[rng.randrange(20, tok.vocab_size) for _ in range(rng.randrange(1, 40))] for _ in range(7)]
    params = SamplingParams(max_new_tokens=12)
    res = {}
    if rank == 0:
        sched = BatchScheduler(model, tok, max_batch=4, broadcast=send, heartbeat_s=0.5).start()
        handles = []
        for i, p in enumerate(prompts):  # three at once (one batched prefill), then staggered joins
            handles.append(sched.submit(p, params))
            if i >= 2:
                time.sleep(0.05)
        got = [list(h) and h.result.token_ids for h in handles]
        sched.close()
        want = [generate(ref, tok, p, params).token_ids for p in prompts]
        res = {"got": got, "want": want, "max_rows": sched.stats["max_rows"], "lens": [len(p) for p in prompts],
               "experts_kept": model.moe_layers()[0].experts.w_gate.shape[0]}
    else:
        follow(BatchState(model, capacity=4), receive)
        res = {"experts_kept": model.moe_layers()[0].experts.w_gate.shape[0]}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(res, f)
    _finish()


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
    # Results are written and the group is torn down: leave without running C++ static
    # destructors, where an intermittent "terminate called without an active exception"
    # (SIGABRT at interpreter exit, ~1 run in 10 on the CI box) turned a passing worker into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
