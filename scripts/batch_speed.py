"""``moecoder serve``'s batching loop (``model.batching.BatchScheduler``) on a full-size random
Qwen3-30B-A3B / DeepSeek-V2-Lite: eager decode steps vs the CUDA-graph steps (``MOECODER_CUDA_GRAPH``).

    PYTHONPATH=$PWD python scripts/batch_speed.py [qwen3-30b-a3b,deepseek-v2-lite] [1,8,32]   # one GPU

B requests of a 500-token prompt (the shipped tokenizer on model/generate.py) submitted at once,
64 greedy tokens each (fewer where a request samples the end-of-text token), a 2,048-position
batch cache. Per mode and batch: a warm-up round (compiles, captures), then a timed round.
Decode tokens/s = tokens after each request's first / (last token - the latest first token).
"""

import gc
import os
import sys
import time

import torch

from model.batching import BatchScheduler
from model.checkpoint import load_model
from model.generate import SamplingParams
from model.hf_bench import CONFIGS, random_moecoder

tok = load_model().tokenizer
dev = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu LAYERS=1: a smoke run
names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CONFIGS)
batches = [int(b) for b in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1, 8, 32]
print(torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch.__version__, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
      flush=True)
prompt = tok.encode(open("model/generate.py").read())[:500]
params = SamplingParams(max_new_tokens=64)


for name in names:
    model = random_moecoder(name, dev, layers=int(os.environ.get("LAYERS", 0)) or None, max_context=4096)
    for B in batches:
        for m in ("0", "auto"):
            os.environ["MOECODER_CUDA_GRAPH"] = m
            sched = BatchScheduler(model, tok, max_batch=B, max_len=2048, prefill_tokens=B * len(prompt)).start()
            try:
                for rep in range(2):
                    lasts = []
                    t0 = time.monotonic()
                    handles = [sched.submit(prompt, params) for _ in range(B)]
                    for h in handles:
                        for _ in h:
                            pass
                        lasts.append(time.monotonic())
                    firsts = [h.first_token_at for h in handles]
                    toks = sum(len(h.result.token_ids) - 1 for h in handles)
                    dt = max(lasts) - max(firsts)
                    if rep == 1:
                        print(f"{name} batch {B} MOECODER_CUDA_GRAPH={m}: first token {1e3 * (max(firsts) - t0):.0f} ms, "
                              f"{toks + B} tokens, decode {toks / dt:.1f} tok/s, wall {time.monotonic() - t0:.2f} s, "
                              f"steps {sched.stats['steps']}", flush=True)
            finally:
                sched.close()
                del sched  # its cache and graphs go back to torch's allocator before the next one
                gc.collect()
    del model
    gc.collect()
    torch.cuda.empty_cache()
