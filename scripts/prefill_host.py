"""Is prefill bound by the host? Time to enqueue one prefill forward vs its wall time with the
GPU synchronised, and the top CUDA kernels of a 2k prefill (Qwen3-30B-A3B / DeepSeek-V2-Lite
shapes, 8 layers, random bf16 weights, full logits, no KV cache).

    PYTHONPATH=$PWD [COMPILE_POINTWISE=1|EAGER_POINTWISE=1] python scripts/prefill_host.py [MODELS] [PROFILE_T]

OPS=1: also the ops (with input shapes) by their own GPU time.
EAGER_POINTWISE=1: RMSNorm and RoPE as the eager upcast/compute/cast-back ops instead of their
one-kernel Triton versions (the A/B of the kernels).
"""

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from model.hf_bench import CONFIGS, random_moecoder

dev = torch.device("cuda")
if os.environ.get("COMPILE_POINTWISE") == "1":  # RMSNorm and RoPE fused by torch.compile (model.layers)
    from model.layers import compile_pointwise

    compile_pointwise(True)
if os.environ.get("EAGER_POINTWISE") == "1":
    import model.layers as layers

    layers.RMSNorm.forward = lambda self, x: layers._POINTWISE["rms_norm"](x, self.weight, self.eps)
    layers.apply_rope = lambda x, cos, sin: layers._POINTWISE["rope"](x, cos, sin)
    layers._rope_in_place = lambda x, cos, sin: False  # MLA's queries: the eager rotation and cat too
names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CONFIGS)
profile_t = int(sys.argv[2]) if len(sys.argv) > 2 else 2048  # the prompt length whose kernels are listed
for name in names:
    model = random_moecoder(name, dev, layers=8)
    for T in (2048, 8192):
        x = torch.randint(0, 1000, (1, T), device=dev)
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
            host, tot = [], []
            for _ in range(5):
                t0 = time.perf_counter()
                model(x)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                host.append(t1 - t0)
                tot.append(time.perf_counter() - t0)
        host.sort()
        tot.sort()
        print(f"{name} 8 layers T={T}: enqueue {host[2] * 1e3:.1f} ms, total {tot[2] * 1e3:.1f} ms, "
              f"{T / tot[2]:.0f} tok/s", flush=True)
        if T == profile_t:
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(x)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
            if os.environ.get("OPS") == "1":  # which ops (with their input shapes) launch that GPU time
                with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                                                     record_shapes=True) as prof:
                    model(x)
                    torch.cuda.synchronize()
                print(prof.key_averages(group_by_input_shape=True).table(
                    sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=90))
            # where the host's time goes: ops by their own CPU time (launches included)
            with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
                model(x)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    del model
    torch.cuda.empty_cache()
