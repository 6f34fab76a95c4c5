"""Triton kernels against the reference ops, forward and backward.

On a CPU box the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set once
for the whole session by ``tests/conftest.py``, before any module defines a kernel) in
float64 on tiny shapes; on a CUDA machine the same
tests run compiled, in bf16, with bf16 tolerances. Inputs are fresh random draws.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.fail("tests/conftest.py sets TRITON_INTERPRET=1 on a machine without CUDA", pytrace=False)

import kernels  # noqa: E402
from kernels import autograd as tk  # noqa: E402
from kernels import reference as ref  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
DT = torch.bfloat16 if CUDA else torch.float64
# relative L2 error allowed: bf16 operands land between 1e-3 and 1e-2 (METHOD.md)
TOL = 2e-2 if CUDA else 1e-10
TOL_F32 = 1e-5  # fp32 routing weights / their gradients


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the Triton result"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rnd(*shape, dtype=DT, scale=1.0, grad=True):
    t = (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def ref_of(t: torch.Tensor) -> torch.Tensor:
    """The reference's input: float64 (CPU interpreter) or float64 upcast of the bf16 tensor."""
    return t.detach().double().requires_grad_(t.requires_grad)


def routing(T, E, K, one_expert=None, empty=()):
    """Distinct experts per token; ``one_expert`` gets every token; experts in ``empty`` get none."""
    logits = torch.randn(T, E, device=DEV)
    if one_expert is not None:
        logits[:, one_expert] += 100.0
    for e in empty:
        logits[:, e] -= 100.0
    w, ex = ref.route(logits, K)
    return w, ex


# ------------------------------------------------------------------------ routing


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (37, 16, 1), (19, 128, 8)])
def test_route(score_func, bias, renorm, T, E, K):
    logits = torch.randn(T, E, device=DEV, dtype=torch.float32, requires_grad=True)
    b = torch.randn(E, device=DEV) * 0.1 if bias else None
    w, e = tk.route(logits, K, score_func, b, renorm)
    lr = logits.detach().double().requires_grad_()
    wr, er = ref.route(lr, K, score_func, b, renorm)
    assert e.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(e, er)
    assert rel(w, wr) < TOL_F32
    g = torch.randn_like(w)
    (dl,) = torch.autograd.grad(w, logits, g)
    (dlr,) = torch.autograd.grad(wr, lr, g.double())
    assert rel(dl, dlr) < TOL_F32


def test_route_rejects_bad_score_func():
    with pytest.raises(ValueError, match="score_func"):
        tk.route(torch.randn(2, 4, device=DEV), 2, "relu")


# ------------------------------------------------------------------ permutation


@pytest.mark.parametrize("pad_to", [1, 16])
@pytest.mark.parametrize(
    "T,E,K,one,empty",
    [(1, 4, 1, None, ()), (37, 8, 2, None, (1, 5)), (21, 6, 3, 2, ()), (9, 128, 8, None, ())],
)
def test_permute_unpermute(pad_to, T, E, K, one, empty):
    D = 24
    w, ex = routing(T, E, K, one, empty)
    x = rnd(T, D)
    xp, counts, offs, ri = tk.permute(x, ex, E, pad_to)
    xr = ref_of(x)
    xpr, countsr, offsr, rir = ref.permute(xr, ex, E, pad_to)
    assert torch.equal(counts, countsr) and torch.equal(offs, offsr) and torch.equal(ri, rir)
    assert torch.equal(xp.double(), xpr)  # a gather is exact
    for e in empty:
        assert counts[e] == 0
    # permute backward: sum over k of the permuted-row gradients
    gp = rnd(*xp.shape, grad=False)
    (gx,) = torch.autograd.grad(xp, x, gp)
    (gxr,) = torch.autograd.grad(xpr, xr, gp.double())
    assert rel(gx, gxr) < TOL

    # unpermute forward and backward (y and the routing weights)
    y = rnd(*xp.shape)
    wt = w.clone().requires_grad_()
    out = tk.unpermute(y, wt, ri, T)
    yr, wr = ref_of(y), w.double().requires_grad_()
    outr = ref.unpermute(yr, wr, ri, T)
    assert rel(out, outr) < TOL
    go = rnd(T, D, grad=False)
    gy, gw = torch.autograd.grad(out, (y, wt), go)
    gyr, gwr = torch.autograd.grad(outr, (yr, wr), go.double())
    assert rel(gy, gyr) < TOL
    assert rel(gw, gwr) < (TOL if not CUDA else TOL) + TOL_F32


@pytest.mark.parametrize(
    "T,E,K,block_m",  # the last two: several segments of assignments and several tile-map programs
    [(3, 8, 2, 16), (60, 128, 2, 16), (150, 6, 2, 16), (301, 16, 4, 64), (2600, 64, 2, 16), (2100, 160, 2, 64)],
)
def test_plan_matches_permute_and_tiles_cover_every_row(T, E, K, block_m):
    from kernels import triton_ops as ops

    _, ex = routing(T, E, K, empty=(1,))
    offs, ri, dest, tm, n_tiles = ops.plan(ex, E, block_m)
    _, _, offs_r, ri_r = ref.permute(torch.zeros(T, 1, device=DEV), ex, E)
    assert torch.equal(offs, offs_r) and torch.equal(ri, ri_r)
    assert torch.equal(ri[dest], torch.arange(T * K, device=DEV))  # dest inverts row_index
    tm = tm.long().cpu()
    seen = torch.zeros(T * K, dtype=torch.int64)
    for e, a, b in tm.t().tolist():
        if a >= b:
            continue
        assert offs[e] <= a and b == offs[e + 1]  # a tile covers rows [a, min(a + BLOCK_M, b))
        seen[a : min(a + block_m, b)] += 1
    assert torch.equal(seen, torch.ones_like(seen))  # each row in exactly one tile


# ------------------------------------------------------------------ grouped GEMM


@pytest.mark.parametrize(
    "sizes",
    [[5], [0, 7, 0, 33, 1], [17, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 130]],
)
def test_grouped_mm(sizes):
    E, D, F = len(sizes), 40, 24
    offs = torch.zeros(E + 1, dtype=torch.int64, device=DEV)
    offs[1:] = torch.tensor(sizes, device=DEV).cumsum(0)
    N = int(offs[-1])
    x, w = rnd(N, D), rnd(E, D, F, scale=D**-0.5)
    y = tk.grouped_mm(x, w, offs)
    xr, wr = ref_of(x), ref_of(w)
    yr = ref.grouped_mm(xr, wr, offs)
    assert rel(y, yr) < TOL
    g = rnd(N, F, grad=False)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), g.double())
    assert rel(gx, gxr) < TOL
    assert rel(gw, gwr) < TOL
    for e, n in enumerate(sizes):
        if n == 0:
            assert torch.count_nonzero(gw[e]) == 0  # an empty group's weight gradient is zero


def test_grouped_mm_uncovered_rows_are_zero():
    x, w = rnd(10, 8, grad=False), rnd(2, 8, 4, grad=False)
    offs = torch.tensor([2, 5, 7], device=DEV)
    y = tk.grouped_mm(x, w, offs)
    assert torch.equal(y[:2], torch.zeros_like(y[:2])) and torch.equal(y[7:], torch.zeros_like(y[7:]))
    assert rel(y, ref.grouped_mm(x.double(), w.double(), offs)) < TOL


# ------------------------------------------------------------------------ SwiGLU


@pytest.mark.parametrize("shape", [(1, 1), (37, 29), (3, 1500)])
def test_swiglu(shape):
    g, u = rnd(*shape, scale=3.0), rnd(*shape)
    h = tk.swiglu(g, u)
    gr, ur = ref_of(g), ref_of(u)
    hr = ref.swiglu(gr, ur)
    assert rel(h, hr) < TOL
    dh = rnd(*shape, grad=False)
    a = torch.autograd.grad(h, (g, u), dh)
    b = torch.autograd.grad(hr, (gr, ur), dh.double())
    assert rel(a[0], b[0]) < TOL and rel(a[1], b[1]) < TOL


# ------------------------------------------------------------- the whole experts op


@pytest.mark.parametrize(
    "T,E,K,one,empty",
    [
        (1, 8, 2, None, ()),  # one token
        (29, 6, 2, 3, ()),  # every token to expert 3
        (37, 8, 2, None, (0, 2, 7)),  # empty experts, T not a multiple of any block
        (23, 4, 1, None, ()),  # top_k = 1
        (11, 16, 8, None, ()),  # top_k = 8
        (9, 128, 8, None, ()),  # 128 experts
        (75, 16, 2, None, (3,)),  # more assignments than the one-launch plan takes
    ],
)
def test_moe_experts(T, E, K, one, empty):
    D, F = 32, 24
    w, ex = routing(T, E, K, one, empty)
    x = rnd(T, D)
    wg, wu = rnd(E, D, F, scale=D**-0.5), rnd(E, D, F, scale=D**-0.5)
    wd = rnd(E, F, D, scale=F**-0.5)
    wt = w.clone().requires_grad_()
    out = tk.moe_experts(x, wt, ex, wg, wu, wd)
    xr, wgr, wur, wdr = (ref_of(t) for t in (x, wg, wu, wd))
    wr = w.double().requires_grad_()
    outr = ref.moe_experts(xr, wr, ex, wgr, wur, wdr)
    assert out.dtype == x.dtype and out.shape == (T, D)
    assert rel(out, outr) < TOL
    go = rnd(T, D, grad=False)
    grads = torch.autograd.grad(out, (x, wt, wg, wu, wd), go)
    grads_r = torch.autograd.grad(outr, (xr, wr, wgr, wur, wdr), go.double())
    names = ("x", "weights", "w_gate", "w_up", "w_down")
    for name, a, b in zip(names, grads, grads_r):
        tol = TOL + (TOL_F32 if name == "weights" else 0.0)
        assert rel(a, b) < tol, name
    for e in empty:
        assert torch.count_nonzero(grads[2][e]) == 0 and torch.count_nonzero(grads[4][e]) == 0


@pytest.mark.parametrize("T,E,K,D,F", [(37, 8, 2, 48, 40), (75, 16, 2, 64, 32), (5, 4, 1, 96, 24)])
def test_tma_grouped_gemms_match_the_pointer_kernels(T, E, K, D, F):
    """The TMA-descriptor gate/up and down kernels (``MOECODER_TMA=1``) against the pointer kernels, on the
    same tile map: gathered and plain A, D and F not whole tiles, empty experts (E=16 with 150 rows)."""
    from kernels import triton_ops as ops

    _, ex = routing(T, E, K, empty=(1,) if E > 4 else ())
    bm = ops.block_m_for(T * K, E)
    offsets, row_index, _, tm, nt = ops.plan(ex, E, bm)
    x = rnd(T, D, grad=False)
    wg, wu = rnd(E, D, F, scale=D**-0.5, grad=False), rnd(E, D, F, scale=D**-0.5, grad=False)
    wd = rnd(E, F, D, scale=F**-0.5, grad=False)
    assert ops._tma_ok(x, wg) and not ops._tma_ok(x, wg.transpose(1, 2))
    outs = {}
    for tma in (False, True):
        g, u, h = ops.gmm_gu(x, wg, wu, tm, nt, bm, T * K, idx=row_index, div=K, tma=tma)
        y = ops.gmm(h, wd, tm, nt, bm, T * K, tma=tma)
        yg = ops.gmm(x, wg, tm, nt, bm, T * K, idx=row_index, div=K, tma=tma)  # gathered A
        outs[tma] = (g, u, h, y, yg)
    for name, a, b in zip(("g", "u", "h", "down", "gathered"), outs[True], outs[False]):
        assert a.shape == b.shape and rel(a, b) < (TOL if CUDA else 1e-12), name
    # and against the reference math: h = silu(x[row] @ Wg[e]) * (x[row] @ Wu[e])
    e_of_row = torch.repeat_interleave(torch.arange(E, device=DEV), offsets.diff())
    xr = x.double()[row_index // K]
    g_ref = torch.einsum("nd,ndf->nf", xr, wg.double()[e_of_row])
    assert rel(outs[True][0], g_ref) < TOL


def test_moe_experts_under_the_tma_switch(monkeypatch):
    monkeypatch.setenv("MOECODER_TMA", "1")
    T, E, K, D, F = 29, 8, 2, 48, 40
    w, ex = routing(T, E, K, empty=(2,))
    x, wg, wu, wd = rnd(T, D), rnd(E, D, F, scale=D**-0.5), rnd(E, D, F, scale=D**-0.5), rnd(E, F, D, scale=F**-0.5)
    out = tk.moe_experts(x, w, ex, wg, wu, wd)
    leaves = [ref_of(t) for t in (x, wg, wu, wd)]
    outr = ref.moe_experts(leaves[0], w.double(), ex, *leaves[1:])
    assert rel(out, outr) < TOL
    go = rnd(T, D, grad=False)
    grads = torch.autograd.grad(out, (x, wg, wu, wd), go)
    grads_r = torch.autograd.grad(outr, leaves, go.double())
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down"), grads, grads_r):
        assert rel(a, b) < TOL, name
    with torch.no_grad():  # inference: G and U not saved
        assert rel(tk.moe_experts(x, w, ex, wg, wu, wd), outr) < TOL


@pytest.mark.parametrize("mode", ["auto", "fused"])
@pytest.mark.parametrize(
    "T,E,K,D,F",
    [(1, 128, 8, 33, 17), (3, 6, 1, 16, 40), (12, 4, 2, 8, 16)],
)
def test_decode_experts_matches_reference(monkeypatch, mode, T, E, K, D, F):
    """Inference (no autograd) for few tokens: the one-launch decode path against the reference."""
    from kernels import autograd as ag

    monkeypatch.setenv("MOECODER_DECODE", mode)
    w, ex = routing(T, E, K)
    x = rnd(T, D, grad=False)
    # parameters that require grad, called under no_grad (as in inference): still the inference path
    wg, wu = rnd(E, D, F, scale=D**-0.5), rnd(E, D, F, scale=D**-0.5)
    wd = rnd(E, F, D, scale=F**-0.5)
    used = []
    real = ag.ops.decode_experts
    monkeypatch.setattr(ag.ops, "decode_experts", lambda *a: used.append(1) or real(*a))
    with torch.no_grad():
        out = tk.moe_experts(x, w, ex, wg, wu, wd)
    assert used == ([1] if mode == "fused" or T <= ag.DECODE_MAX_TOKENS else [])
    outr = ref.moe_experts(ref_of(x), ref_of(w.to(x.dtype)), ex, *(ref_of(t) for t in (wg, wu, wd)))
    assert out.dtype == x.dtype and out.shape == (T, D)
    assert rel(out, outr) < TOL
    monkeypatch.setenv("MOECODER_DECODE", "tiles")
    with torch.no_grad():
        tiles = tk.moe_experts(x, w, ex, wg, wu, wd)
    assert len(used) <= 1 and rel(out, tiles.double()) < TOL


def test_decode_experts_workspace_left_clean_across_calls():
    """The one-launch decode path keeps its fp32 accumulator and counters in a per-device workspace
    that the last program of each token zeroes again: calls of different sizes in a row (one
    expert shared by every token, so its programs add into every token's row) give the reference."""
    from kernels import triton_ops as ops

    E, K, D, F = 5, 2, 24, 40
    wg, wu = rnd(E, D, F, scale=D**-0.5, grad=False), rnd(E, D, F, scale=D**-0.5, grad=False)
    wd = rnd(E, F, D, scale=F**-0.5, grad=False)
    for T in (6, 2, 6, 1):
        w, ex = routing(T, E, K, one_expert=3)
        x = rnd(T, D, grad=False)
        out = ops.decode_experts(x, w, ex, wg, wu, wd)
        outr = ref.moe_experts(ref_of(x), ref_of(w.to(x.dtype)), ex, *(ref_of(t) for t in (wg, wu, wd)))
        assert rel(out, outr) < TOL, T
        acc, cnt = ops._decode_workspace(x.device, T, D, torch.float64 if DT == torch.float64 else torch.float32)
        assert torch.count_nonzero(acc) == 0 and torch.count_nonzero(cnt) == 0, T


@pytest.mark.parametrize("dh,dx", [("grouped_mm", "triton"), ("triton", "grouped_mm"), ("grouped_mm", "grouped_mm")])
def test_moe_experts_weight_grads_through_grouped_path(monkeypatch, dh, dx):
    """MOECODER_DW=grouped_mm (gather + K-grouped GEMM; a loop on CPU) gives the reference gradients,
    with the dH GEMM from the library + the epilogue pass or the fused Triton kernel, and dX from
    the dual Triton GEMM or two library GEMMs summed in the combine."""
    monkeypatch.setenv("MOECODER_DW", "grouped_mm")
    monkeypatch.setenv("MOECODER_DH", dh)
    monkeypatch.setenv("MOECODER_DX", dx)
    T, E, K, D, F = 37, 8, 2, 32, 24
    w, ex = routing(T, E, K, empty=(0, 5))
    x = rnd(T, D)
    wg, wu = rnd(E, D, F, scale=D**-0.5), rnd(E, D, F, scale=D**-0.5)
    wd = rnd(E, F, D, scale=F**-0.5)
    wt = w.clone().requires_grad_()
    out = tk.moe_experts(x, wt, ex, wg, wu, wd)
    go = rnd(T, D, grad=False)
    grads = torch.autograd.grad(out, (x, wt, wg, wu, wd), go)
    xr, wgr, wur, wdr = (ref_of(t) for t in (x, wg, wu, wd))
    wr = w.double().requires_grad_()
    outr = ref.moe_experts(xr, wr, ex, wgr, wur, wdr)
    grads_r = torch.autograd.grad(outr, (xr, wr, wgr, wur, wdr), go.double())
    for name, a, b in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads_r):
        assert rel(a, b) < TOL + (TOL_F32 if name == "weights" else 0.0), name
    for e in (0, 5):
        assert all(torch.count_nonzero(g[e]) == 0 for g in grads[2:])


def test_kernel_path_env_rejects_bad_values(monkeypatch):
    T, E, K, D, F = 2, 4, 2, 8, 8
    w, ex = routing(T, E, K)
    x = rnd(T, D, grad=False)
    wg, wu, wd = rnd(E, D, F, grad=False), rnd(E, D, F, grad=False), rnd(E, F, D, grad=False)
    monkeypatch.setenv("MOECODER_DECODE", "fast")
    with pytest.raises(ValueError, match="MOECODER_DECODE"), torch.no_grad():
        tk.moe_experts(x, w, ex, wg, wu, wd)
    monkeypatch.setenv("MOECODER_DECODE", "auto")
    monkeypatch.setenv("MOECODER_DW", "cublas")
    out = tk.moe_experts(x, w, ex, wg.requires_grad_(), wu, wd)
    with pytest.raises(ValueError, match="MOECODER_DW"):
        out.sum().backward()


@settings(max_examples=6, deadline=None, derandomize=False)
@given(
    T=st.integers(1, 40), E=st.integers(1, 12), K=st.integers(1, 4), D=st.integers(1, 40), F=st.integers(1, 40),
    score=st.sampled_from(["softmax", "sigmoid"]),
)  # fmt: skip
def test_moe_layer_random_shapes(T, E, K, D, F, score):
    """Routing + experts end to end on random small shapes (odd D and F included), fwd and bwd."""
    K = min(K, E)
    logits = torch.randn(T, E, device=DEV, requires_grad=True)
    x = rnd(T, D)
    wg, wu, wd = rnd(E, D, F), rnd(E, D, F), rnd(E, F, D)
    w, e = tk.route(logits, K, score)
    out = tk.moe_experts(x, w, e, wg, wu, wd)
    lr = logits.detach().double().requires_grad_()
    xr, wgr, wur, wdr = (ref_of(t) for t in (x, wg, wu, wd))
    wr, er = ref.route(lr, K, score)
    assert torch.equal(e, er)
    outr = ref.moe_experts(xr, wr.to(xr.dtype), er, wgr, wur, wdr)
    assert rel(out, outr) < max(TOL, 1e-6)
    go = rnd(T, D, grad=False)
    a = torch.autograd.grad(out, (logits, x, wg, wu, wd), go)
    b = torch.autograd.grad(outr, (lr, xr, wgr, wur, wdr), go.double())
    for ga, gb in zip(a, b):
        assert rel(ga, gb) < max(TOL, 1e-5)


def test_moe_experts_matches_loop_and_fp32_weights_cast():
    """Parameters in float32 with activations in another dtype (autocast) are cast, as the model does."""
    T, E, K, D, F = 13, 4, 2, 16, 8
    w, ex = routing(T, E, K)
    x = rnd(T, D, grad=False)
    wg, wu, wd = (torch.randn(E, D, F, device=DEV) * 0.2, torch.randn(E, D, F, device=DEV) * 0.2,
                  torch.randn(E, F, D, device=DEV) * 0.2)  # fmt: skip
    out = tk.moe_experts(x, w, ex, wg, wu, wd)
    loop = ref.moe_experts_loop(x.double(), w.double(), ex, wg.double(), wu.double(), wd.double())
    assert out.dtype == x.dtype
    assert rel(out, loop) < max(TOL, 1e-6)


def test_moe_experts_rejects_bad_shapes():
    x = rnd(4, 8, grad=False)
    w, ex = routing(4, 3, 2)
    wg, wd = rnd(3, 8, 6, grad=False), rnd(3, 6, 8, grad=False)
    with pytest.raises(ValueError, match="do not fit"):
        tk.moe_experts(x, w, ex, wg, wg, wd.transpose(1, 2))
    with pytest.raises(ValueError, match="weights"):
        tk.moe_experts(x, w[:, :1], ex, wg, wg, wd)


def test_bench_cli_bad_input_is_one_line_exit_2(capsys):
    from kernels import bench

    with pytest.raises(SystemExit) as exc:
        bench.main(["--reps", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    if not CUDA:
        assert bench.main([]) == 2  # no GPU: a one-line error, no traceback
        assert "needs a CUDA GPU" in capsys.readouterr().err


# -------------------------------------------------------------------- dispatcher


def test_dispatcher_env(monkeypatch):
    t = torch.zeros(1, device=DEV)
    monkeypatch.setenv("MOECODER_KERNELS", "reference")
    assert kernels.backend(t) == "reference"
    monkeypatch.setenv("MOECODER_KERNELS", "triton")
    assert kernels.backend(t) == "triton"
    monkeypatch.setenv("MOECODER_KERNELS", "auto")
    assert kernels.backend(t) == ("triton" if CUDA else "reference")
    monkeypatch.setenv("MOECODER_KERNELS", "fast")
    with pytest.raises(ValueError, match="MOECODER_KERNELS"):
        kernels.backend(t)


def test_dispatcher_routes_to_triton(monkeypatch):
    monkeypatch.setenv("MOECODER_KERNELS", "triton")
    T, E, K, D, F = 5, 4, 2, 8, 8
    w, ex = routing(T, E, K)
    x = rnd(T, D, grad=False)
    wg, wu, wd = rnd(E, D, F, grad=False), rnd(E, D, F, grad=False), rnd(E, F, D, grad=False)
    a = kernels.moe_experts(x, w, ex, wg, wu, wd)
    monkeypatch.setenv("MOECODER_KERNELS", "reference")
    b = kernels.moe_experts(x, w, ex, wg, wu, wd)
    assert rel(a, b.double()) < TOL
    w1, e1 = kernels.route(torch.randn(3, E, device=DEV), 2)
    assert e1.shape == (3, 2) and w1.shape == (3, 2)


# ------------------------------------------------------------- inside the model


def test_tiny_model_same_loss_and_grads_with_either_path(monkeypatch):
    """The tiny model's loss and every parameter gradient agree between the two kernel paths
    (float32; on CUDA the compiled kernels, whose dots may use TF32, get TF32 tolerances)."""
    import dataclasses

    import torch.nn.functional as F

    from model.config import get_preset
    from model.transformer import Transformer

    calls = []
    real = tk.moe_experts
    monkeypatch.setattr(tk, "moe_experts", lambda *a: calls.append(1) or real(*a))
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEV).train()
    tokens = torch.randint(0, 512, (2, 24), device=DEV)
    loss_tol, grad_tol = (2e-3, 2e-2) if CUDA else (1e-5, 1e-4)

    def loss_and_grads(mode):
        monkeypatch.setenv("MOECODER_KERNELS", mode)
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) + model.aux_loss()
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_t, grads_t = loss_and_grads("triton")
    assert len(calls) == sum(1 for _ in model.moe_layers())  # the Triton path ran in every MoE layer
    loss_r, grads_r = loss_and_grads("reference")
    assert len(calls) == sum(1 for _ in model.moe_layers())
    assert abs(float(loss_t - loss_r)) < loss_tol
    assert grads_t.keys() == grads_r.keys() and any("w_gate" in n for n in grads_t)
    for n in grads_r:
        assert rel(grads_t[n], grads_r[n]) < grad_tol, n


# ------------------------------------------------- the decode layer op (issue #18)


def _layer_inputs(T, E, D, F, FS, bias):
    x = rnd(T, D, grad=False)
    wr = torch.randn(E, D, device=DEV) * D**-0.5  # fp32 router, as in the model
    b = torch.randn(E, device=DEV) * 0.1 if bias else None
    ws = [rnd(E, D, F, scale=D**-0.5, grad=False), rnd(E, D, F, scale=D**-0.5, grad=False),
          rnd(E, F, D, scale=F**-0.5, grad=False)]  # fmt: skip
    sh = [rnd(D, FS, scale=D**-0.5, grad=False), rnd(D, FS, scale=D**-0.5, grad=False),
          rnd(FS, D, scale=FS**-0.5, grad=False)] if FS else []  # fmt: skip
    return x, wr, b, ws, sh


@pytest.mark.parametrize(
    "T,E,K,D,F,FS,score,bias,groups,scaling",
    [
        (1, 16, 4, 24, 40, 48, "softmax", False, (1, 1, "max"), 1.0),  # a shared expert wider than the routed
        (3, 16, 4, 24, 17, 0, "sigmoid", True, (4, 2, "top2sum"), 2.5),  # DeepSeek-V3 style routing
        (8, 12, 3, 20, 16, 30, "softmax", False, (4, 3, "max"), 1.0),  # DeepSeek-V2 style groups, odd D
    ],
)  # fmt: skip
def test_moe_layer_decode_matches_reference(T, E, K, D, F, FS, score, bias, groups, scaling):
    """The three-launch decode layer (router GEMV + top-k + plan, gate/up with the shared experts,
    down + combine) gives the reference layer: same experts, weights, output."""
    x, wr, b, ws, sh = _layer_inputs(T, E, D, F, FS, bias)
    ng, tg, gs = groups
    out, w, e = tk.moe_layer_decode(x, wr, b, K, score, True, ng, tg, gs, scaling, *ws, *sh)
    outr, wr_, er = ref.moe_layer_decode(ref_of(x), wr, b, K, score, True, ng, tg, gs, scaling,
                                         *(ref_of(t) for t in ws + sh))  # fmt: skip
    assert torch.equal(e, er)
    assert w.dtype == torch.float32 and rel(w, wr_) < TOL_F32
    assert out.dtype == x.dtype and out.shape == (T, D)
    assert rel(out, outr) < max(TOL, 1e-6)  # the reference's router is fp32 (as in the model)
    if FS:  # the shared experts' gate/up in the other launch (router's or routed gate/up's)
        from kernels import triton_moe_layer as tml

        out2, _, e2 = tml.moe_layer_decode(x, wr, b, K, score, True, ng, tg, gs, scaling, *ws, *sh,
                                           shared_in_router=not tml.SHARED_IN_ROUTER)  # fmt: skip
        assert torch.equal(e2, er) and rel(out2, outr) < max(TOL, 1e-6)


def test_moe_layer_decode_one_warp_router_env(monkeypatch):
    """MOECODER_ROUTER_WARPS=1 (launch 1 in one warp, the shared gate/up moved to launch 2) gives
    the reference layer; a bad value is refused."""
    from kernels import triton_moe_layer as tml

    T, E, K, D, F, FS = 2, 16, 4, 24, 40, 48
    x, wr, b, ws, sh = _layer_inputs(T, E, D, F, FS, False)
    outr, _, er = ref.moe_layer_decode(ref_of(x), wr, None, K, "softmax", True, 1, 1, "max", 1.0,
                                       *(ref_of(t) for t in ws + sh))  # fmt: skip
    monkeypatch.setenv("MOECODER_ROUTER_WARPS", "1")
    assert tml.router_warps_from_env() == 1
    out, _, e = tml.moe_layer_decode(x, wr, None, K, "softmax", True, 1, 1, "max", 1.0, *ws, *sh)
    assert torch.equal(e, er) and rel(out, outr) < max(TOL, 1e-6)
    monkeypatch.setenv("MOECODER_ROUTER_WARPS", "3")
    with pytest.raises(ValueError, match="MOECODER_ROUTER_WARPS"):
        tml.moe_layer_decode(x, wr, None, K, "softmax", True, 1, 1, "max", 1.0, *ws, *sh)


def test_moe_layer_decode_pdl_env(monkeypatch):
    """MOECODER_PDL: programmatic dependent launch only on a CUDA device of sm_90+ (off on the CPU
    and under the interpreter whatever the setting, so the launches there take no PDL flag); with
    it forced on or off the layer still gives the reference; a bad value is refused."""
    from kernels import triton_moe_layer as tml

    T, E, K, D, F, FS = 2, 16, 4, 24, 40, 48
    x, wr, b, ws, sh = _layer_inputs(T, E, D, F, FS, False)
    outr, _, er = ref.moe_layer_decode(ref_of(x), wr, None, K, "softmax", True, 1, 1, "max", 1.0,
                                       *(ref_of(t) for t in ws + sh))  # fmt: skip
    for v in ("0", "1", "auto"):
        monkeypatch.setenv("MOECODER_PDL", v)
        on = tml.pdl_wanted(x.device)
        assert on == (v != "0" and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= (0 if v == "1" else 9))
        out, _, e = tml.moe_layer_decode(x, wr, None, K, "softmax", True, 1, 1, "max", 1.0, *ws, *sh)
        assert torch.equal(e, er) and rel(out, outr) < max(TOL, 1e-6)
    monkeypatch.setenv("MOECODER_PDL", "yes")
    with pytest.raises(ValueError, match="MOECODER_PDL"):
        tml.pdl_wanted(x.device)


def test_moe_layer_decode_workspace_left_clean_across_calls():
    """Logit and output accumulators and counters are zero again after every call (calls of
    different sizes in a row; one expert shared by every token)."""
    from kernels import triton_moe_layer as tml

    E, K, D, F, FS = 6, 2, 24, 16, 16
    for T in (5, 1, 5):
        x, wr, b, ws, sh = _layer_inputs(T, E, D, F, FS, False)
        wr[3] = x[0].float() * 10.0 / D**0.5  # expert 3: a large logit for most tokens
        out, _, e = tk.moe_layer_decode(x, wr, None, K, "softmax", False, 1, 1, "max", 1.0, *ws, *sh)
        outr, _, er = ref.moe_layer_decode(ref_of(x), wr, None, K, "softmax", False, 1, 1, "max", 1.0,
                                           *(ref_of(t) for t in ws + sh))  # fmt: skip
        assert torch.equal(e, er) and rel(out, outr) < max(TOL, 1e-6), T
        ws_ = tml._WS[(str(x.device), torch.float64 if DT == torch.float64 else torch.float32)]
        assert all(torch.count_nonzero(t) == 0 for t in ws_), T


@pytest.mark.parametrize("mode", ["layer", "auto"])
def test_model_moe_uses_the_decode_layer_under_no_grad(monkeypatch, mode):
    """model.moe.MoE calls kernels.moe_layer_decode for few tokens at inference when MOECODER_DECODE
    says so (``layer``; ``auto``: T <= DECODE_LAYER_MAX_TOKENS), with the same output as the separate
    ops (tiles path); group-limited sigmoid routing with bias, scaling and a shared expert."""
    import dataclasses

    from model.config import get_preset
    from model.moe import MoE

    cfg = dataclasses.replace(get_preset("tiny"), dim=32, n_experts=8, top_k=2, expert_hidden=16, n_shared_experts=1,
                              score_func="sigmoid", n_groups=4, topk_groups=2, group_score="top2sum",
                              routed_scaling=1.5, bias_update_rate=0.01)  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(cfg).to(DEV).eval()
    moe.reset_parameters(0.2, 0.2)
    moe.expert_bias.copy_(torch.randn(8) * 0.05)
    x = torch.randn(1, 3, 32, device=DEV)
    monkeypatch.setenv("MOECODER_KERNELS", "triton")
    used = []
    real = tk.moe_layer_decode
    monkeypatch.setattr(tk, "moe_layer_decode", lambda *a: used.append(1) or real(*a))
    monkeypatch.setenv("MOECODER_DECODE", mode)
    with torch.no_grad():
        y = moe(x)
    counts = moe.last["counts"]
    assert used == ([1] if mode == "layer" or 3 <= tk.DECODE_LAYER_MAX_TOKENS else [])
    monkeypatch.setenv("MOECODER_DECODE", "tiles")
    with torch.no_grad():
        y_ref = moe(x)
    assert len(used) <= 1 and y.shape == y_ref.shape
    assert rel(y, y_ref) < (2e-3 if CUDA else 1e-5)  # fp32 model: TF32 dots on CUDA
    assert torch.equal(counts, moe.last["counts"]) and int(counts.sum()) == 3 * 2
    y_grad = moe(x)  # with autograd: never the decode layer
    assert len(used) <= 1 and rel(y_grad, y_ref) < (2e-3 if CUDA else 1e-5)
