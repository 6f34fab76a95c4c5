"""Benchmark the MoE layer on a GPU: Triton kernels against their peers.

    python -m kernels.bench [--shapes qwen3,dsv2] [--tokens 4096,16384] [--decode 1,8,64]
                            [--reps 20] [--json PATH] [--check] [--decode-chain N]

The layer: fp32 router GEMM, top-k routing, routed experts (SwiGLU), shared experts (when
the shape has them), bf16. Paths, all with the same FLOPs:
  triton      kernels.autograd (route kernel + the fused experts Function)
  loop        reference routing + a per-expert Python loop (HF transformers' eager MoE)
  grouped_mm  reference routing + torch-side permutation + torch._grouped_mm (torchtitan)
  layer       decode only: kernels.autograd.moe_layer_decode, the whole layer (router GEMV,
              top-k, plan, routed + shared experts, combine) in three launches
  dense       the same layer FLOPs as plain dense GEMMs (routed part: T*K rows through one
              expert-sized MLP, no permutation): the ceiling
Timing: CUDA events around each call, median of many calls after warm-up, rotating among
fresh random input sets (never zeros). Decode sizes run forward only, replayed from CUDA
graphs where the path allows it (the loop path syncs, so it runs eagerly), and report the
bandwidth reached against the HBM floor: bytes of the weights the batch touches over the
bandwidth of a large device-to-device copy measured in the same run. ``--decode-chain N`` also times each
decode path as a model runs it: N layers with their own weights back to back in one graph, per layer (no
graph launch or input copy per layer).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    name: str
    D: int
    E: int
    K: int
    F: int
    n_shared: int
    renormalize: bool


SHAPES = {
    "qwen3": Shape("Qwen3-30B-A3B", 2048, 128, 8, 768, 0, True),
    "dsv2": Shape("DeepSeek-V2-Lite", 2048, 64, 6, 1408, 2, False),
}


def layer_flops(s: Shape, T: int) -> float:
    """Forward FLOPs of the layer (router + routed experts + shared experts)."""
    routed = 2 * 3 * T * s.K * s.D * s.F
    shared = 2 * 3 * T * s.D * s.F * s.n_shared
    return 2 * T * s.D * s.E + routed + shared


class Params:
    def __init__(self, s: Shape, dev, dt=torch.bfloat16, grad=True, seed: int = 1234):
        g = torch.Generator(device=dev).manual_seed(seed)

        def r(*shape, scale, dtype=dt):
            return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype).requires_grad_(grad)

        self.wr = r(s.E, s.D, scale=s.D**-0.5, dtype=torch.float32)
        self.wg = r(s.E, s.D, s.F, scale=s.D**-0.5)
        self.wu = r(s.E, s.D, s.F, scale=s.D**-0.5)
        self.wd = r(s.E, s.F, s.D, scale=s.F**-0.5)
        Fs = s.F * s.n_shared
        self.sg = r(s.D, Fs, scale=s.D**-0.5) if Fs else None
        self.su = r(s.D, Fs, scale=s.D**-0.5) if Fs else None
        self.sd = r(Fs, s.D, scale=max(Fs, 1) ** -0.5) if Fs else None
        # dense peer: one expert-sized MLP
        self.dg = r(s.D, s.F, scale=s.D**-0.5)
        self.du = r(s.D, s.F, scale=s.D**-0.5)
        self.dd = r(s.F, s.D, scale=s.F**-0.5)

    def leaves(self, path):
        base = [self.wr] + ([self.sg, self.su, self.sd] if self.sg is not None else [])
        if path == "dense":
            return base + [self.dg, self.du, self.dd]
        return base + [self.wg, self.wu, self.wd]

    def touched_bytes(self, s: Shape, n_experts_touched: float) -> float:
        b = self.wr.numel() * 4 + n_experts_touched * 3 * s.D * s.F * 2
        return b + (3 * s.D * s.F * s.n_shared * 2)


def gmm_permute(x, weights, experts, E):
    T, K = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    tok = order // K
    return x[tok], offs, tok, weights.reshape(-1)[order]


def grouped_mm_experts(x, weights, experts, wg, wu, wd):
    xs, offs, tok, w = gmm_permute(x, weights, experts, wg.shape[0])
    h = F.silu(torch._grouped_mm(xs, wg, offs=offs)) * torch._grouped_mm(xs, wu, offs=offs)
    ys = torch._grouped_mm(h, wd, offs=offs) * w.to(x.dtype)[:, None]
    return torch.zeros_like(x).index_add(0, tok, ys)


def make_layer(path: str, s: Shape, p: Params):
    from kernels import autograd as tk
    from kernels import reference as ref

    def shared(x):
        if p.sg is None:
            return None
        return (F.silu(x @ p.sg) * (x @ p.su)) @ p.sd

    def layer(inp):
        x = inp["x"]
        logits = x.float() @ p.wr.t() if path != "layer" else None
        if path == "dense":
            xr = inp["x_rep"]
            y_rep = (F.silu(xr @ p.dg) * (xr @ p.du)) @ p.dd
            sh = shared(x)
            return [logits, y_rep] + ([sh] if sh is not None else [])
        if path == "layer":  # the whole layer in one op (router inside; three launches), decode only
            sh = (p.sg, p.su, p.sd) if p.sg is not None else ()
            y, _, _ = tk.moe_layer_decode(x, p.wr, None, s.K, "softmax", s.renormalize, 1, 1, "max", 1.0,
                                          p.wg, p.wu, p.wd, *sh)  # fmt: skip
            return [y]
        if path == "triton":
            w, e = tk.route(logits, s.K, "softmax", None, s.renormalize)
            y = tk.moe_experts(x, w, e, p.wg, p.wu, p.wd)
        elif path == "loop":
            w, e = ref.route(logits, s.K, "softmax", None, s.renormalize)
            y = ref.moe_experts_loop(x, w, e, p.wg, p.wu, p.wd)
        elif path == "grouped_mm":
            w, e = ref.route(logits, s.K, "softmax", None, s.renormalize)
            y = grouped_mm_experts(x, w, e, p.wg, p.wu, p.wd)
        else:
            raise ValueError(path)
        sh = shared(x)
        return [y if sh is None else y + sh]

    return layer


def make_inputs(s: Shape, T: int, n_sets: int, dev, grad: bool, dense: bool):
    sets = []
    for _ in range(n_sets):
        d = {"x": torch.randn(T, s.D, device=dev, dtype=torch.bfloat16).requires_grad_(grad)}
        d["g"] = torch.randn(T, s.D, device=dev, dtype=torch.bfloat16)
        if dense:
            d["x_rep"] = torch.randn(T * s.K, s.D, device=dev, dtype=torch.bfloat16).requires_grad_(grad)
            d["g_rep"] = torch.randn(T * s.K, s.D, device=dev, dtype=torch.bfloat16)
            d["g_logits"] = torch.randn(T, s.E, device=dev)
        sets.append(d)
    return sets


def time_calls(fn, sets, reps: int, warm: int = 3) -> list[float]:
    for i in range(warm):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    evs = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(sets[i % len(sets)])
        b.record()
        evs.append((a, b))
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in evs]


def fwd_bwd_fn(layer, p: Params, path: str):
    leaves = p.leaves(path)

    def fn(inp):
        outs = layer(inp)
        if path == "dense":
            gouts = [inp["g_logits"], inp["g_rep"]] + ([inp["g"]] if len(outs) > 2 else [])
            ins = [inp["x"], inp["x_rep"]] + leaves
        else:
            gouts = [inp["g"]]
            ins = [inp["x"]] + leaves
        torch.autograd.grad(outs, ins, gouts)

    return fn


def fwd_fn(layer):
    def fn(inp):
        with torch.no_grad():
            layer(inp)

    return fn


def graph_fn(layer, sets):
    """Capture the forward once on a static input; each call copies a fresh set in and replays."""
    static = {k: v.detach().clone() for k, v in sets[0].items()}
    with torch.no_grad():
        for _ in range(2):
            layer(static)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(static)

    def fn(inp):
        static["x"].copy_(inp["x"])
        graph.replay()

    return fn


def chain_fn(path: str, s: Shape, n_layers: int, dev, T: int):
    """Decode as a model runs it: ``n_layers`` layers with their own weights (nothing shared in L2) back to
    back in one CUDA graph, each layer's output the next one's input. Each call copies a fresh input in
    and replays; the caller divides by ``n_layers`` for the time of one layer."""
    ps = [Params(s, dev, grad=False, seed=4321 + i) for i in range(n_layers)]
    layers = [make_layer(path, s, p) for p in ps]
    static = torch.randn(T, s.D, device=dev, dtype=torch.bfloat16)

    def run():
        x = static
        for layer in layers:
            x = layer({"x": x})[0]
        return x

    with torch.no_grad():
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()

    def fn(inp):
        static.copy_(inp["x"])
        graph.replay()

    fn.params = ps  # keep the weights alive with the graph
    return fn


def copy_bandwidth(dev) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    ms = statistics.median(time_calls(lambda _: dst.copy_(src), [None], 20))
    return 2 * n / (ms * 1e-3)


def matmul_tflops(dev) -> float:
    n = 8192
    sets = [(torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16))
            for _ in range(2)]  # fmt: skip
    ms = statistics.median(time_calls(lambda ab: ab[0] @ ab[1], sets, 20))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def check(s: Shape, T: int, dev) -> dict:
    """Triton vs the reference in fp32 (upcast bf16 inputs) at a real shape: relative L2 errors."""
    from kernels import autograd as tk
    from kernels import reference as ref

    p = Params(s, dev)
    x = torch.randn(T, s.D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    logits = (x.float() @ p.wr.t()).detach().requires_grad_()
    w, e = tk.route(logits, s.K, "softmax", None, s.renormalize)
    wl = w.detach().requires_grad_()
    out = tk.moe_experts(x, wl, e, p.wg, p.wu, p.wd)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, wl, p.wg, p.wu, p.wd], g)
    lr = logits.detach().clone().requires_grad_()
    wr_, er_ = ref.route(lr, s.K, "softmax", None, s.renormalize)
    res = {"experts_equal": bool(torch.equal(e, er_)), "route_w": _rel(w, wr_)}
    leaves = [t.detach().float().requires_grad_() for t in (x, wl, p.wg, p.wu, p.wd)]
    outr = ref.moe_experts(leaves[0], leaves[1], e, *leaves[2:])
    gr = torch.autograd.grad(outr, leaves, g.float())
    res["out"] = _rel(out, outr)
    for name, a, b in zip(["dx", "dweights", "dw_gate", "dw_up", "dw_down"], grads, gr):
        res[name] = _rel(a, b)
    # routing backward
    gw = torch.randn_like(w)
    w2, _ = tk.route(logits, s.K, "softmax", None, s.renormalize)
    (dl,) = torch.autograd.grad(w2, logits, gw)
    (dlr,) = torch.autograd.grad(wr_, lr, gw)
    res["route_dlogits"] = _rel(dl, dlr)
    return res


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _dw_gu_grouped(ops, x, dg, du, row_index, K, offsets):
    xs = x.index_select(0, row_index // K)
    return ops.grouped_at_b(xs, dg, offsets), ops.grouped_at_b(xs, du, offsets)


def graph_time(fn, reps: int = 20, inner: int = 16) -> float:
    """Median ms of one ``fn(i)`` for i = 0..inner-1 replayed back to back from one CUDA graph."""
    for i in range(inner):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fn(i)
    return statistics.median(time_calls(lambda _: graph.replay(), [None], reps)) / inner


def decode_breakdown(s: Shape, T: int, dev, inner: int = 16) -> list[dict]:
    """Decode: each launch of the layer alone (graph-replayed back to back), an empty launch.

    Separates launch overhead (a trivial kernel's cost per launch in a graph) from the time
    the weight-streaming kernels take; bytes per kernel give its bandwidth. Each of the
    ``inner`` back-to-back calls uses its own input and routing, so consecutive calls touch
    different experts (the weights do not stay in L2).
    """
    from kernels import triton_ops as ops

    p = Params(s, dev, grad=False)
    K, E, D, Fh = s.K, s.E, s.D, s.F
    N = T * K
    bm = ops.block_m_for(N, E)
    sets = []
    for _ in range(inner):
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        logits = x.float() @ p.wr.t()
        w, e = ops.route_fwd(logits, K, "softmax", None, s.renormalize)
        plan = ops.plan(e, E, bm)
        _, _, hh = ops.gmm_gu(x, p.wg, p.wu, plan[3], plan[4], bm, N, idx=plan[1], div=K, save_gu=False)
        y = ops.gmm(hh, p.wd, plan[3], plan[4], bm, N)
        sets.append(dict(x=x, logits=logits, w=w, e=e, plan=plan, hh=hh, y=y))
    wbytes = statistics.mean(float(q["e"].unique().numel()) for q in sets) * D * Fh * 2
    one = torch.zeros(1, device=dev)
    from kernels import triton_moe_layer as tml

    shw = (p.sg, p.su, p.sd) if p.sg is not None else (None, None, None)
    sbytes = 3 * D * Fh * s.n_shared * 2
    for q in sets:
        q["lp"] = tml.route_plan(q["x"], p.wr, None, K, "softmax", s.renormalize, 1, 1, "max", 1.0)
        q["lh"] = tml.gate_up(q["x"], q["lp"][2], q["lp"][3], q["lp"][4], K, p.wg, p.wu, shw[0], shw[1])
        q["lh"] = (q["lh"][0], q["lh"][1] if p.sg is not None else None)

    def shared_torch(i):
        if p.sg is not None:
            x = sets[i]["x"]
            (F.silu(x @ p.sg) * (x @ p.su)) @ p.sd

    def tiles_gu(i):
        q = sets[i]
        _, ri, _, tm, nt = q["plan"]
        ops.gmm_gu(q["x"], p.wg, p.wu, tm, nt, bm, N, idx=ri, div=K, save_gu=False)

    def tiles_down(i):
        q = sets[i]
        ops.gmm(q["hh"], p.wd, q["plan"][3], q["plan"][4], bm, N)

    pieces = {
        "empty launch (one tiny kernel)": (lambda i: one.add_(1.0), 0),
        "router: cast + fp32 GEMV": (lambda i: sets[i]["x"].float() @ p.wr.t(), p.wr.numel() * 4),
        "route (top-k)": (lambda i: ops.route_fwd(sets[i]["logits"], K, "softmax", None, s.renormalize), 0),
        "layer: router+top-k+plan, 1 launch": (
            lambda i: tml.route_plan(sets[i]["x"], p.wr, None, K, "softmax", s.renormalize, 1, 1, "max", 1.0),
            p.wr.numel() * 4),
        "layer: gate/up routed": (
            lambda i: tml.gate_up(sets[i]["x"], sets[i]["lp"][2], sets[i]["lp"][3], sets[i]["lp"][4], K, p.wg, p.wu),
            2 * wbytes),
        "layer: down+combine routed+shared": (
            lambda i: tml.down_combine(sets[i]["lh"][0], sets[i]["lh"][1], sets[i]["lp"][2], sets[i]["lp"][0],
                                       sets[i]["lp"][3], sets[i]["lp"][4], T, K, p.wd, shw[2]), wbytes + sbytes / 3),
        "layer: whole layer, 3 launches": (
            lambda i: tml.moe_layer_decode(sets[i]["x"], p.wr, None, K, "softmax", s.renormalize, 1, 1, "max", 1.0,
                                           p.wg, p.wu, p.wd, *(shw if p.sg is not None else ()), shared_in_router=False),
            p.wr.numel() * 4 + 3 * wbytes + sbytes),
    }
    if T <= 2:  # launch 1 in one warp (reductions by shuffles; kernels-notes run 7), shared gate/up in launch 2
        pieces["layer: router+top-k+plan, 1 warp"] = (
            lambda i: tml.route_plan(sets[i]["x"], p.wr, None, K, "softmax", s.renormalize, 1, 1, "max", 1.0,
                                     num_warps=1), p.wr.numel() * 4)
        pieces["layer: whole layer, launch 1 in 1 warp"] = (
            lambda i: tml.moe_layer_decode(sets[i]["x"], p.wr, None, K, "softmax", s.renormalize, 1, 1, "max", 1.0,
                                           p.wg, p.wu, p.wd, *(shw if p.sg is not None else ()),
                                           shared_in_router=False, router_warps=1),
            p.wr.numel() * 4 + 3 * wbytes + sbytes)
    if p.sg is not None:  # where the shared experts' gate/up go: the router's launch or the routed gate/up's
        pieces["layer: router+top-k+plan + shared gate/up"] = (
            lambda i: tml.route_plan(sets[i]["x"], p.wr, None, K, "softmax", s.renormalize, 1, 1, "max", 1.0,
                                     p.sg, p.su), p.wr.numel() * 4 + 2 * sbytes / 3)
        pieces["layer: gate/up routed+shared"] = (
            lambda i: tml.gate_up(sets[i]["x"], sets[i]["lp"][2], sets[i]["lp"][3], sets[i]["lp"][4], K, p.wg, p.wu,
                                  p.sg, p.su), 2 * wbytes + 2 * sbytes / 3)
        pieces["layer: whole layer, shared gate/up in the router launch"] = (
            lambda i: tml.moe_layer_decode(sets[i]["x"], p.wr, None, K, "softmax", s.renormalize, 1, 1, "max", 1.0,
                                           p.wg, p.wu, p.wd, *shw, shared_in_router=True),
            p.wr.numel() * 4 + 3 * wbytes + sbytes)
        pieces["shared experts in torch"] = (shared_torch, sbytes)
    pieces |= {
        "tiles: plan": (lambda i: ops.plan(sets[i]["e"], E, bm), 0),
        "tiles: gate/up+SwiGLU": (tiles_gu, 2 * wbytes),
        "tiles: down": (tiles_down, wbytes),
        "tiles: combine": (lambda i: ops.combine(sets[i]["y"], sets[i]["plan"][2], T, K, scale_TK=sets[i]["w"]), 0),
    }
    out = []
    for name, (fn, nbytes) in pieces.items():
        try:
            ms = graph_time(fn, inner=inner)
        except Exception as exc:
            print(f"  decode breakdown {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        bw = nbytes / (ms * 1e-3) / 1e12 if nbytes else 0.0
        out.append({"shape": s.name, "T": T, "piece": name, "us": ms * 1e3, "TBps": bw})
        print(f"  {s.name:16s} decode T={T:3d} {name:34s} {ms * 1e3:8.2f} us {bw:6.2f} TB/s", flush=True)
    return out


def breakdown(s: Shape, T: int, dev, reps: int = 20) -> list[dict]:
    """Time each Triton piece of the experts' forward and backward alone, with torch._grouped_mm twins."""
    from kernels import triton_ops as ops

    p = Params(s, dev, grad=False)
    K, E, D, Fh = s.K, s.E, s.D, s.F
    N = T * K
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    logits = x.float() @ p.wr.t()
    w, e = ops.route_fwd(logits, K, "softmax", None, s.renormalize)
    bm = ops.block_m_for(N, E)
    offsets, row_index, dest, tm, nt = ops.plan(e, E, bm)
    g, u, h = ops.gmm_gu(x, p.wg, p.wu, tm, nt, bm, N, idx=row_index, div=K)
    dout = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
    dg, du, _, hs = ops.gmm_dh(dout, row_index, K, w.reshape(-1), p.wd, g, u, tm, nt, bm, write_hs=True)
    xs = x[row_index // K]
    offs32 = offsets[1:].to(torch.int32)
    gemm = 2 * N * D * Fh
    pieces = {
        "route": (lambda: ops.route_fwd(logits, K, "softmax", None, s.renormalize), 0),
        "plan (counts, offsets, tile map, destinations)": (lambda: ops.plan(e, E, bm), 0),
        "fwd gate/up+swiglu (gather)": (
            lambda: ops.gmm_gu(x, p.wg, p.wu, tm, nt, bm, N, idx=row_index, div=K, tma=False), 2 * gemm),
        "fwd gate/up+swiglu (gather), TMA weights": (
            lambda: ops.gmm_gu(x, p.wg, p.wu, tm, nt, bm, N, idx=row_index, div=K, tma=True), 2 * gemm),
        "fwd gate/up+swiglu (gather), inference (G, U not saved)": (
            lambda: ops.gmm_gu(x, p.wg, p.wu, tm, nt, bm, N, idx=row_index, div=K, save_gu=False, tma=False), 2 * gemm),
        "fwd gate/up+swiglu (gather), inference, TMA weights": (
            lambda: ops.gmm_gu(x, p.wg, p.wu, tm, nt, bm, N, idx=row_index, div=K, save_gu=False, tma=True), 2 * gemm),
        "fwd down": (lambda: ops.gmm(h, p.wd, tm, nt, bm, N, tma=False), gemm),
        "fwd down, TMA": (lambda: ops.gmm(h, p.wd, tm, nt, bm, N, tma=True), gemm),
        "fwd combine": (lambda: ops.combine(h.new_empty(N, D), dest, T, K, scale_TK=w), 0),
        "bwd dH+swiglu'+dw (gather)": (
            lambda: ops.gmm_dh(dout, row_index, K, w.reshape(-1), p.wd, g, u, tm, nt, bm, write_hs=True), gemm),
        "bwd dX dual": (lambda: ops.gmm(dg, p.wg.transpose(1, 2), tm, nt, bm, N, a2=du, b2=p.wu.transpose(1, 2)),
                        2 * gemm),
        "bwd dW_down (s*H saved)": (lambda: ops.gmm_dw(hs, dout, offsets, b_mode=1, bidx=row_index, divb=K), gemm),
        "bwd dW_gate+up (gather)": (lambda: ops.gmm_dw(x, dg, offsets, a_mode=1, aidx=row_index, diva=K, b2=du),
                                    2 * gemm),
        "bwd gather xs = x[token] (N x D)": (lambda: x.index_select(0, row_index // K), 0),
        "bwd dW_gate+up grouped_mm (gather + 2 GEMMs)": (lambda: _dw_gu_grouped(ops, x, dg, du, row_index, K, offsets),
                                                         2 * gemm),
        "bwd dW_down grouped_mm (gather + GEMM)": (
            lambda: ops.grouped_at_b(hs, dout.index_select(0, row_index // K), offsets), gemm),
        "peer _grouped_mm x@Wg": (lambda: torch._grouped_mm(xs, p.wg, offs=offs32), gemm),
        "peer _grouped_mm h@Wd": (lambda: torch._grouped_mm(h, p.wd, offs=offs32), gemm),
        "peer _grouped_mm dG@Wg^T": (lambda: torch._grouped_mm(dg, p.wg.transpose(1, 2), offs=offs32), gemm),
        "peer _grouped_mm xs^T@dG": (lambda: torch._grouped_mm(xs.t(), dg, offs=offs32), gemm),
        "dense mm (N,D)@(D,F)": (lambda: xs @ p.dg, gemm),
    }
    if not ops._tma_ok(x, p.wg):  # the TMA kernels would fall back to the pointer ones: no mislabelled rows
        pieces = {k: v for k, v in pieces.items() if "TMA" not in k}
    out = []
    for name, (fn, flops) in pieces.items():
        try:
            ms = statistics.median(time_calls(lambda _, f=fn: f(), [None], reps))
        except Exception as exc:
            print(f"  breakdown {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        tf = flops / (ms * 1e-3) / 1e12 if flops else 0.0
        out.append({"shape": s.name, "T": T, "piece": name, "ms": ms, "tflops": tf})
        print(f"  {s.name:16s} T={T:6d} {name:30s} {ms:8.3f} ms {tf:7.1f} TFLOP/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    class _Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit code 2
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(2)

    ap = _Parser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="qwen3,dsv2")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--decode", default="1,8,64")
    ap.add_argument("--paths", default="triton,grouped_mm,dense,loop")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--check", action="store_true", help="also check Triton vs reference at T=4096")
    ap.add_argument("--breakdown", default="", help="only time each Triton piece at these T (e.g. 16384)")
    ap.add_argument("--decode-breakdown", default="", help="only time each decode launch at these T (e.g. 1,8)")
    ap.add_argument("--decode-chain", type=int, default=0, metavar="N",
                    help="also time each decode path as N layers with their own weights in one graph (per layer)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: kernels.bench needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        shapes = [SHAPES[n] for n in args.shapes.split(",") if n]
        tokens = [int(t) for t in args.tokens.split(",") if t]
        decode = [int(t) for t in args.decode.split(",") if t]
        paths = [q for q in args.paths.split(",") if q]
    except (KeyError, ValueError) as exc:
        print(f"error: bad argument: {exc}", file=sys.stderr)
        return 2
    import triton

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": "python -m kernels.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    bw = copy_bandwidth(dev)
    mm = matmul_tflops(dev)
    meta["copy_bw_TBps"] = bw / 1e12
    meta["matmul_8192_tflops"] = mm
    print(json.dumps(meta), flush=True)
    rows = []
    checks = {}
    if args.breakdown or args.decode_breakdown:
        parts = [r for sh in shapes for t in args.breakdown.split(",") if t for r in breakdown(sh, int(t), dev)]
        parts += [r for sh in shapes for t in args.decode_breakdown.split(",") if t
                  for r in decode_breakdown(sh, int(t), dev)]  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "breakdown": parts}, f, indent=1)
        return 0
    for s in shapes:
        if args.check:
            checks[s.name] = check(s, 4096, dev)
            print(f"check {s.name} T=4096:", json.dumps(checks[s.name]), flush=True)
        p = Params(s, dev)
        for mode, Ts in (("fwd+bwd", tokens), ("fwd", tokens), ("decode", decode)):
            for T in Ts:
                n_sets = 3
                sets = make_inputs(s, T, n_sets, dev, grad=mode == "fwd+bwd", dense="dense" in paths)
                flops = layer_flops(s, T) * (3 if mode == "fwd+bwd" else 1)
                touched = None
                if mode == "decode":
                    with torch.no_grad():
                        nt = [float((x["x"].float() @ p.wr.t()).topk(s.K, -1).indices.unique().numel()) for x in sets]
                    touched = p.touched_bytes(s, sum(nt) / len(nt))
                res = {}
                for path in paths:
                    if (mode == "decode" and path == "dense") or (path == "layer" and (mode != "decode" or T > 16)):
                        continue
                    layer = make_layer(path, s, p)
                    reps = args.reps if not (path == "loop" and T >= 16384) else max(5, args.reps // 4)
                    try:
                        if mode == "fwd+bwd":
                            fn = fwd_bwd_fn(layer, p, path)
                        elif mode == "decode" and path != "loop":
                            fn = graph_fn(layer, sets)
                            reps = max(reps, 100)
                        else:
                            fn = fwd_fn(layer)
                        ms = statistics.median(time_calls(fn, sets, reps))
                    except Exception as exc:  # report and go on: one failing peer must not end the run
                        print(f"  {s.name} {mode} T={T} {path}: FAILED {type(exc).__name__}: {exc}", flush=True)
                        continue
                    res[path] = ms
                    timed = [(path, ms)]
                    if mode == "decode" and path != "loop" and args.decode_chain > 0:
                        try:
                            cfn = chain_fn(path, s, args.decode_chain, dev, T)
                            cms = statistics.median(time_calls(cfn, sets, reps)) / args.decode_chain
                            timed.append((f"{path}, chain of {args.decode_chain}", cms))
                            del cfn
                        except Exception as exc:
                            print(f"  {s.name} decode chain T={T} {path}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    for pname, ms in timed:
                        row = {"shape": s.name, "mode": mode, "T": T, "path": pname, "ms": ms,
                               "tflops": flops / (ms * 1e-3) / 1e12}  # fmt: skip
                        if touched is not None:
                            row["touched_MB"] = touched / 1e6
                            row["floor_ms"] = touched / bw * 1e3
                            row["bw_TBps"] = touched / (ms * 1e-3) / 1e12
                            row["of_floor"] = row["floor_ms"] / ms
                        rows.append(row)
                        extra = ""
                        if touched is not None:
                            extra = f"  {row['bw_TBps']:.2f} TB/s = {row['of_floor'] * 100:.0f}% of floor {row['floor_ms'] * 1e3:.1f} us"
                        print(f"  {s.name:16s} {mode:7s} T={T:6d} {pname:10s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s{extra}",
                              flush=True)  # fmt: skip
                for row in rows:
                    if row["shape"] == s.name and row["mode"] == mode and row["T"] == T and "triton" in res and row["path"] in res:
                        row["triton_speedup"] = row["ms"] / res["triton"]
                torch.cuda.empty_cache()
    print()
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | CUDA {meta['cuda']} | {meta['date']}")
    print(f"# copy {bw / 1e12:.2f} TB/s (read+write), bf16 8192^3 matmul {mm:.0f} TFLOP/s")
    print("| shape | mode | T | path | ms | TFLOP/s | triton speed-up | % of dense TFLOP/s | BW (% of floor) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dense = next((q for q in rows if q["shape"] == r["shape"] and q["mode"] == r["mode"] and q["T"] == r["T"]
                      and q["path"] == "dense"), None)  # fmt: skip
        pct = f"{r['tflops'] / dense['tflops'] * 100:.0f}%" if dense else ""
        bwc = f"{r['bw_TBps']:.2f} TB/s ({r['of_floor'] * 100:.0f}%)" if "bw_TBps" in r else ""
        sp = f"{r.get('triton_speedup', float('nan')):.2f}x" if "triton_speedup" in r else ""
        print(f"| {r['shape']} | {r['mode']} | {r['T']} | {r['path']} | {r['ms']:.3f} | {r['tflops']:.1f} | {sp} | {pct} | {bwc} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "checks": checks, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
