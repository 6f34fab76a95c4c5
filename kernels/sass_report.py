"""Compile the grouped-GEMM kernels for Hopper (sm_90) on a machine without a GPU and count
what matters in the machine code: wgmma (HGMMA), async copies (LDGSTS), local-memory
spills (LDL/STL), shared memory. Costs no device time.

    python -m kernels.sass_report

Pointer arguments are assumed 16-byte aligned and unit strides specialised, as Triton
does at run time for contiguous tensors. Uses the ptxas/cuobjdump bundled with Triton.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

MNEMONICS = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG.E.128", "LDL", "STL")


def _compile(fn, types: dict, consts: dict, warps: int, stages: int, extra_div: tuple = ()) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    while isinstance(fn, Autotuner) or type(fn).__name__ == "Heuristics":
        fn = fn.fn
    sig, attrs = {}, {}
    for i, n in enumerate(fn.arg_names):
        sig[n] = "constexpr" if n in consts else types.get(n, "i32")
        if sig[n].startswith("*") or (sig[n] == "i32" and (n.startswith("stride") or n in ("N", "Kd", "F", "D", "M") + extra_div)):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    out = {m: len(re.findall(rf"\b{re.escape(m)}\b", sass)) for m in MNEMONICS}
    out["shared"] = k.metadata.shared
    out["regs"] = getattr(k, "n_regs", None) or getattr(k.metadata, "num_regs", None) or -1
    return out


def tl_f32():
    import triton.language as tl

    return tl.float32


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET (this compiles for the GPU)", file=sys.stderr)
        return 2
    try:
        from kernels import triton_ops as ops
    except ImportError as exc:
        print(f"error: triton is not installed: {exc}", file=sys.stderr)
        return 2
    B, I64, I32, F32 = "*bf16", "*i64", "*i32", "*fp32"
    common = dict(PREC=None, ACC64=False)
    gmm_t = dict(a_ptr=B, a2_ptr=B, idx_ptr=I64, b_ptr=B, b2_ptr=B, c_ptr=B, tm_ptr=I32)
    gu_t = dict(x_ptr=B, idx_ptr=I64, wg_ptr=B, wu_ptr=B, g_ptr=B, u_ptr=B, h_ptr=B, tm_ptr=I32)
    dh_t = dict(dout_ptr=B, idx_ptr=I64, sw_ptr=F32, wd_ptr=B, g_ptr=B, u_ptr=B, dg_ptr=B, du_ptr=B, dwp_ptr=F32,
                hs_ptr=B, tm_ptr=I32)  # fmt: skip
    dw_t = dict(a_ptr=B, aidx_ptr=I64, u_ptr=B, b_ptr=B, b2_ptr=B, bidx_ptr=I64, bs_ptr=F32, c_ptr=B, c2_ptr=B,
                offs_ptr=I64)  # fmt: skip
    cases = [
        ("fwd gate/up+SwiGLU 128x128x64", ops._gmm_gu_kernel, gu_t,
         dict(stride_wn=1, GATHER=True, SAVE_GU=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, EVEN=False), 8, 3),
        ("fwd down 128x256x64", ops._gmm_kernel, gmm_t,
         dict(stride_ak=1, stride_bn=1, DIV=1, GATHER=False, DUAL=False, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 8, 3),
        ("bwd dX dual 128x128x64", ops._gmm_kernel, gmm_t,
         dict(stride_ak=1, stride_bk=1, DIV=1, GATHER=False, DUAL=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3),
        ("bwd dH 128x128x128 (run 1)", ops._gmm_dh_kernel, dh_t,
         dict(stride_wd=1, WRITE_HS=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128), 8, 3),
        ("bwd dH 128x64x128", ops._gmm_dh_kernel, dh_t,
         dict(stride_wd=1, WRITE_HS=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128), 8, 3),
        ("bwd dH 128x64x64 4 warps", ops._gmm_dh_kernel, dh_t,
         dict(stride_wd=1, WRITE_HS=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 4, 4),
        ("bwd dW_gate+up 128x128x64", ops._gmm_dw_kernel, dw_t,
         dict(A_MODE=1, B_MODE=0, HAS_BS=False, DUAL=True, A_T=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3),
        ("bwd dW_down 128x128x64", ops._gmm_dw_kernel, dw_t,
         dict(A_MODE=0, B_MODE=1, HAS_BS=False, DUAL=False, A_T=True, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3),
    ]  # fmt: skip
    dec_t = dict(x_ptr=B, e_ptr=I64, s_ptr=F32, wg_ptr=B, wu_ptr=B, wd_ptr=B, acc_ptr=F32, cnt_ptr=I32, out_ptr=B)
    for c in ops._DEC_GPU:
        cases.append((f"decode 1-launch BN={c['BLOCK_N']} BK={c['BLOCK_K']} BD={c['BLOCK_D']}", ops._decode_moe_kernel,
                      dec_t, dict(stride_wn=1, stride_dd=1, ACC64=False, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                                  BLOCK_D=c["BLOCK_D"]), c["w"], c["s"]))  # fmt: skip
    from kernels import triton_moe_layer as tml

    rt_t = dict(x_ptr=B, wr_ptr=F32, bias_ptr=F32, lg_ptr=F32, cnt_ptr=I32, w_ptr=F32, e_ptr=I64, rowidx_ptr=I64,
                tm_ptr=I32, sg_ptr=B, su_ptr=B, hs_ptr=B, scaling="fp32")  # fmt: skip
    for t_, e_, k_, nw in ((1, 128, 8, None), (8, 128, 8, None), (1, 64, 6, None), (8, 64, 6, None),
                           (1, 128, 8, 1), (2, 128, 8, 1), (1, 64, 6, 1), (2, 64, 6, 1)):
        m_ = tml._router_meta(t_, e_, 2048, k_, 1, nw)
        w_ = m_.pop("num_warps")
        cases.append((f"layer router T={t_} E={e_} K={k_}", tml._router_kernel, rt_t,
                      dict(K=k_, SOFTMAX=True, HAS_BIAS=False, RENORM=True, N_GROUPS=1, TOPK_GROUPS=1,
                           GROUP_TOP2=False, SHARED=False, SBN=32, SBK=128, PDL=False, **m_), w_, 1))  # fmt: skip
    lgu_t = dict(x_ptr=B, rowidx_ptr=I64, wg_ptr=B, wu_ptr=B, sg_ptr=B, su_ptr=B, h_ptr=B, hs_ptr=B, tm_ptr=I32)
    ldn_t = dict(h_ptr=B, hs_ptr=B, rowidx_ptr=I64, w_ptr=F32, wd_ptr=B, sd_ptr=B, acc_ptr=F32, cnt_ptr=I32,
                 out_ptr=B, tm_ptr=I32)  # fmt: skip
    for c in tml._LAYER_GPU:
        bn, bk = c["BLOCK_N"], c["BLOCK_K"]
        cases.append((f"layer gate/up BN={bn} BK={bk}", tml._gu_kernel, lgu_t,
                      dict(stride_wn=1, stride_sn=1, BM=16, BLOCK_N=bn, BLOCK_K=bk), c["w"], c["s"]))
        cases.append((f"layer down+combine BN={bn} BK={bk}", tml._down_kernel, ldn_t,
                      dict(stride_dd=1, stride_sd=1, BM=16, BLOCK_TO=1, BLOCK_N=bn, BLOCK_K=bk, PDL=False),
                      c["w"], c["s"]))  # fmt: skip
    from kernels import triton_decode as tdec

    gv_t = dict(x_ptr=B, d_ptr=B, nw_ptr=B, w_ptr=B, b_ptr=B, y_ptr=B, h_ptr=B, eps="fp32")
    for c in tdec._GEMV_GPU:
        cases.append((f"decode norm+GEMV BN={c['BN']} BK={c['BK']}", tdec._norm_gemv_kernel, gv_t,
                      dict(HAS_DELTA=True, HAS_NORM=True, HAS_BIAS=False, ACC=tl_f32(), BN=c["BN"], BK=c["BK"],
                           ONE_CHUNK=c["BK"] >= 2048),
                      c["w"], 1))  # fmt: skip
    at_t = dict(q_ptr=B, q2_ptr=B, k1_ptr=B, k2_ptr=B, v_ptr=B, o_ptr=B, pm_ptr=F32, pa_ptr=F32, pos_ptr=I64,
                pad_ptr=I64, scale="fp32")  # fmt: skip
    for name, d1, d2, dv, split in (("MLA", 512, 64, 512, True), ("GQA", 128, 16, 128, True), ("GQA", 128, 16, 128, False)):
        big = max(d1 + d2, dv)
        cases.append((f"decode attention {name} split={split}", tdec._decode_attn_kernel, at_t,
                      dict(HAS_K2=name == "MLA", HAS_PAD=False, ACC=tl_f32(),
                           PREC=None, D1=d1, D2=d2, DV=dv, BLOCK_R=16, BLOCK_L=32 if big > 256 else 64, SPLIT=split),
                      8 if big > 256 else 4, 1))  # fmt: skip
    cases.append(("decode attention combine", tdec._decode_attn_combine, dict(pm_ptr=F32, pa_ptr=F32, o_ptr=B),
                  dict(BLOCK_R=16, DV=512, BLOCK_S=64, BLOCK_DV=64), 4, 1))
    # prefill pieces (issue #12, 2026-12-07): router logits from bf16, MLA keys, the segmented plan, add+norm
    cases.append(("prefill router logits E=64", tdec._router_kernel, dict(x_ptr=B, w_ptr=B, o_ptr=F32),
                  dict(ACC=tl_f32(), PREC=None, BT=32, BE=64, BK=64), 4, 1))
    cases.append(("prefill router logits E=256", tdec._router_kernel, dict(x_ptr=B, w_ptr=B, o_ptr=F32),
                  dict(ACC=tl_f32(), PREC=None, BT=32, BE=256, BK=32), 8, 1))
    cases.append(("prefill MLA keys", tdec._mla_keys_kernel, dict(kv_ptr=B, pe_ptr=B, k_ptr=B),
                  dict(DN=128, DR=64, BN=128, BR=64, BLOCK_H=16), 4, 1))
    cases.append(("add+norm, two deltas", tdec._add_rms_norm_kernel,
                  dict(x_ptr=B, d_ptr=B, d2_ptr=B, w_ptr=B, h_ptr=B, y_ptr=B, eps="fp32"),
                  dict(HAS_DELTA=True, HAS_DELTA2=True, ACC=tl_f32(), BLOCK=2048), 4, 1))
    cases.append(("plan: segment counts", ops._seg_counts_kernel, dict(flat_ptr=I64, seg_ptr=I32),
                  dict(BLOCK=128, BLOCK_E=64), 4, 1))
    cases.append(("plan: tile map, 8 programs", ops._tile_map_kernel, dict(cnt_ptr=I32, offs_ptr=I64, tm_ptr=I32),
                  dict(FROM_COUNTS=True, BM=128, BLOCK_E=64, BLOCK_T=64, NPROG=8), 4, 1))
    cases.append(("plan: destinations", ops._dest_seg_kernel,
                  dict(flat_ptr=I64, offs_ptr=I64, seg_ptr=I32, dest_ptr=I64, rowidx_ptr=I64),
                  dict(BLOCK=1024, BLOCK_E=64, BLOCK_S=32), 4, 1))
    for c in ops._GU_GPU:
        cases.append((f"fwd gate/up EVEN BN={c['BLOCK_N']} BK={c['BLOCK_K']}", ops._gmm_gu_kernel, gu_t,
                      dict(stride_wn=1, GATHER=True, SAVE_GU=False, BLOCK_M=128, BLOCK_N=c["BLOCK_N"],
                           BLOCK_K=c["BLOCK_K"], EVEN=True), c["w"], c["s"]))  # fmt: skip
    # TMA-descriptor weights (MOECODER_TMA; 2026-12-08)
    for c in ops._GU_TMA_GPU:
        bk, bn = c["BLOCK_K"], c["BLOCK_N"]
        d = f"tensordesc<bf16[{bk},{bn}]>"
        cases.append((f"fwd gate/up TMA BN={bn} BK={bk}", ops._gmm_gu_tma_kernel,
                      dict(x_ptr=B, idx_ptr=I64, wg_desc=d, wu_desc=d, g_ptr=B, u_ptr=B, h_ptr=B, tm_ptr=I32),
                      dict(GATHER=True, SAVE_GU=False, BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, EVEN_D=True),
                      c["w"], c["s"]))  # fmt: skip
    for c in ops._GMM_TMA_GPU:
        bk, bn = c["BLOCK_K"], c["BLOCK_N"]
        cases.append((f"fwd down TMA BN={bn} BK={bk}", ops._gmm_tma_kernel,
                      dict(a_ptr=B, a_desc=f"tensordesc<bf16[128,{bk}]>", idx_ptr=I64,
                           b_desc=f"tensordesc<bf16[{bk},{bn}]>", c_ptr=B, tm_ptr=I32),
                      dict(DIV=1, GATHER=False, BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk), c["w"], c["s"]))  # fmt: skip
    c = tml._LAYER_GPU[0]  # programmatic dependent launch
    cases.append(("layer down+combine PDL", tml._down_kernel, ldn_t,
                  dict(stride_dd=1, stride_sd=1, BM=16, BLOCK_TO=1, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                       PDL=True), c["w"], c["s"]))  # fmt: skip
    only = os.environ.get("SASS_ONLY", "")
    cases = [c for c in cases if only in c[0]]
    print(f"{'kernel':34s} warps stages " + " ".join(f"{m:>6s}" for m in MNEMONICS) + "  shared regs")
    for name, fn, types, consts, w, s in cases:
        try:
            names = fn.arg_names if hasattr(fn, "arg_names") else (fn.fn.arg_names if hasattr(fn.fn, "arg_names")
                                                                    else fn.fn.fn.arg_names)
            r = _compile(fn, types, {k: v for k, v in {**common, **consts}.items() if k in names}, w, s,
                         ("K",) if "GEMV" in name else ())
        except Exception as exc:  # report and go on
            print(f"{name:34s} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        print(f"{name:34s} {w:5d} {s:6d} " + " ".join(f"{r[m]:6d}" for m in MNEMONICS) + f"  {r['shared']} {r['regs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
