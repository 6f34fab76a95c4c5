"""Run a few MoE-layer calls for Nsight Compute, and summarise what it measured.

    ncu --profile-from-start off --clock-control none --metrics METRICS -o REP python -m kernels.ncu_probe
    ncu --import REP.ncu-rep --csv --page raw > ncu.csv && python -m kernels.ncu_probe --summarize ncu.csv

Each case is warmed up (Triton autotuning, cuBLAS handles) outside the profiled range, then
one call runs between cudaProfilerStart/Stop, preceded by a marker kernel so the summary can
tell the cases apart. The summary prints each kernel's time, DRAM bytes and bandwidth.
"""

from __future__ import annotations

import csv
import os
import sys

CASES = [  # (shape, mode, T, MOECODER_DECODE)
    ("qwen3", "decode", 1, "auto"),
    ("qwen3", "decode", 1, "tiles"),
    ("dsv2", "decode", 1, "auto"),
    ("qwen3", "decode", 8, "auto"),
    ("qwen3", "fwd+bwd", 16384, "auto"),
]
METRICS = ",".join([
    "gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum", "launch__grid_size",
    "launch__registers_per_thread", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed", "sm__warps_active.avg.pct_of_peak_sustained_active",
])  # fmt: skip


def run() -> int:
    import torch
    import triton
    import triton.language as tl

    from kernels import bench as B

    @triton.jit
    def _ncu_marker_kernel(p):
        tl.store(p, 1.0)

    dev = torch.device("cuda")
    mark = torch.zeros(1, device=dev)
    only = {int(a) for a in sys.argv[1:]}  # case indices (default: all)
    for i, (name, mode, T, dec) in enumerate(CASES):
        if only and i not in only:
            continue
        os.environ["MOECODER_DECODE"] = dec
        s = B.SHAPES[name]
        p = B.Params(s, dev)
        sets = B.make_inputs(s, T, 2, dev, grad=mode == "fwd+bwd", dense=False)
        layer = B.make_layer("triton", s, p)
        fn = B.fwd_bwd_fn(layer, p, "triton") if mode == "fwd+bwd" else B.fwd_fn(layer)
        for j in range(3):
            fn(sets[j % 2])
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        _ncu_marker_kernel[(1,)](mark)
        fn(sets[1])
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"ncu_probe: case {i}: {name} {mode} T={T} MOECODER_DECODE={dec}", flush=True)
        del p, sets
        torch.cuda.empty_cache()
    return 0


def _num(v: str) -> float:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return float("nan")


def summarize(path: str, only: set[int] | None = None) -> int:
    cases = [c for i, c in enumerate(CASES) if not only or i in only]
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    head, units, data = rows[start], rows[start + 1], rows[start + 2 :]
    col = {n: i for i, n in enumerate(head)}
    unit = {n: units[i] for n, i in col.items()}
    tscale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
              "second": 1e6, "s": 1e6}.get(unit.get("gpu__time_duration.sum", ""), 1.0)  # fmt: skip
    bscale = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}
    case = -1
    print(f"{'case':28s} {'kernel':44s} {'us':>9s} {'MB rd':>8s} {'MB wr':>8s} {'TB/s':>6s} {'grid':>7s} {'regs':>4s} "
          f"{'SM%':>5s} {'DRAM%':>5s} {'occ%':>5s}")  # fmt: skip
    for r in data:
        if len(r) < len(head):
            continue
        name = r[col["Kernel Name"]]
        if "_ncu_marker_kernel" in name:
            case += 1
            continue
        label = "{} {} T={} {}".format(*cases[case]) if 0 <= case < len(cases) else "?"
        us = _num(r[col["gpu__time_duration.sum"]]) * tscale
        rd = _num(r[col["dram__bytes_read.sum"]]) * bscale.get(unit["dram__bytes_read.sum"], 1.0)
        wr = _num(r[col["dram__bytes_write.sum"]]) * bscale.get(unit["dram__bytes_write.sum"], 1.0)
        tbs = (rd + wr) / (us * 1e-6) / 1e12 if us > 0 else 0.0

        def g(m, r=r):
            return r[col[m]] if m in col else ""

        print(f"{label:28s} {name[:44]:44s} {us:9.1f} {rd / 1e6:8.1f} {wr / 1e6:8.1f} {tbs:6.2f} "
              f"{g('launch__grid_size'):>7s} {g('launch__registers_per_thread'):>4s} "
              f"{g('sm__throughput.avg.pct_of_peak_sustained_elapsed')[:5]:>5s} "
              f"{g('dram__throughput.avg.pct_of_peak_sustained_elapsed')[:5]:>5s} "
              f"{g('sm__warps_active.avg.pct_of_peak_sustained_active')[:5]:>5s}")  # fmt: skip
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--summarize":
        sys.exit(summarize(sys.argv[2], {int(a) for a in sys.argv[3:]}))
    if len(sys.argv) == 2 and sys.argv[1] == "--metrics":
        print(METRICS)
        sys.exit(0)
    sys.exit(run())
