"""The product's generation loop (``model.generate.stream``) on a full-size random Qwen3-30B-A3B /
DeepSeek-V2-Lite: eager decode steps vs the CUDA-graph static decoder (``MOECODER_CUDA_GRAPH``).

    PYTHONPATH=$PWD python scripts/generate_speed.py [qwen3-30b-a3b,deepseek-v2-lite]   # one GPU

A 500-token prompt (the shipped tokenizer on model/generate.py), 64 greedy tokens, four
generations per model: eager, graph (first: includes the capture), graph again, eager again.
Decode tokens/s counts from the first streamed token to the last. Then the time to the first token
of a 2,000-token prompt prefilled in chunks of 512 (the CPU's chunk) vs 4,096 (the GPU default),
``MOECODER_PREFILL_CHUNK``; median of 3 after a warm-up.
"""

import gc
import os
import sys
import time

import torch

from model.checkpoint import load_model
from model.generate import SamplingParams, stream
from model.hf_bench import CONFIGS, random_moecoder

tok = load_model().tokenizer
dev = torch.device("cuda")
names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CONFIGS)
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
for name in names:
    model = random_moecoder(name, dev, max_context=4096)
    prompt = tok.encode(open("model/generate.py").read())[:500]
    params = SamplingParams(max_new_tokens=64)
    for m in ("0", "auto", "auto", "0"):
        os.environ["MOECODER_CUDA_GRAPH"] = m
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        times = [time.perf_counter() for _ in stream(model, tok, prompt, params)]
        n = len(times)
        dec = (n - 1) / (times[-1] - times[0]) if n > 1 else float("nan")
        print(f"{name} MOECODER_CUDA_GRAPH={m}: prompt {len(prompt)} tokens, first token {1e3 * (times[0] - t0):.0f} ms, "
              f"{n} tokens, decode {dec:.1f} tok/s, total {time.perf_counter() - t0:.2f} s", flush=True)
    long_prompt = tok.encode(open("model/generate.py").read() + open("model/batching.py").read())[:2000]
    os.environ["MOECODER_CUDA_GRAPH"] = "auto"
    for chunk in ("512", "4096"):
        os.environ["MOECODER_PREFILL_CHUNK"] = chunk
        firsts = []
        for _ in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in stream(model, tok, long_prompt, SamplingParams(max_new_tokens=2)):
                firsts.append(time.perf_counter() - t0)
                break
        ttft = sorted(firsts[1:])[1]
        print(f"{name} prompt {len(long_prompt)} tokens, MOECODER_PREFILL_CHUNK={chunk}: first token {1e3 * ttft:.0f} ms "
              f"({len(long_prompt) / ttft:.0f} prompt tok/s)", flush=True)
    os.environ.pop("MOECODER_PREFILL_CHUNK")
    del model
    gc.collect()
    torch.cuda.empty_cache()
