#!/usr/bin/env bash
# One device call: the TMA-descriptor grouped GEMMs (MOECODER_TMA) against the pointer kernels, and the
# decode layer per layer in a chain (kernels.bench --decode-chain), each step with its own time limit; a call
# cut off still returns the finished steps' logs under $OUT.
#   bash scripts/gpu_tma_ab.sh        # on the GPU machine, from the repository root
# 1. GPU tests of the TMA kernels (bf16), 2. each GEMM alone (kernels.bench --breakdown), 3. the 8k prefill with
# MOECODER_TMA off/on in one process (scripts/prefill_ab.py), 4. the MoE layer fwd+bwd / decode with it off and on,
# 5. open checkpoints vs transformers at 8k, decode b1 (model.hf_bench) with the better setting.
. "$(dirname "$0")/gpu_steps.sh"  # the log header and step()
MOECODER_TRITON_AUTOTUNE=0 step 80 tests python3 -m pytest -q -x tests/test_kernels.py -k "tma or moe_experts or grouped"
step 80 breakdown python3 -m kernels.bench --shapes dsv2,qwen3 --breakdown 8192,16384 --reps 10
step 90 prefill_ab python3 scripts/prefill_ab.py deepseek-v2-lite,qwen3-30b-a3b 8192 MOECODER_TMA
step 110 kernels_bench python3 -m kernels.bench --tokens 4096,16384 --decode 1,8,64 --paths triton,grouped_mm,layer \
  --decode-chain 8 --json "$OUT/kernels_bench.json"
MOECODER_TMA=1 step 70 kernels_bench_tma python3 -m kernels.bench --tokens 4096,16384 --decode "" \
  --paths triton --json "$OUT/kernels_bench_tma.json"
# the prefill setting that won in step 3 (DeepSeek's 8k is the figure short of its target)
TMA=$(python3 - "$OUT/prefill_ab.log" <<'EOF'
import re, sys
ms = {}
for line in open(sys.argv[1]):
    m = re.match(r"deepseek-v2-lite\s+(off|tma)\s+([\d.]+) ms", line)
    if m:
        ms[m.group(1)] = float(m.group(2))
print(1 if ms.get("tma", 1e9) < ms.get("off", 0) else 0)
EOF
)
echo "== MOECODER_TMA=$TMA for hf_bench" | tee -a "$L"
MOECODER_TMA=$TMA step 170 hf_bench python3 -m model.hf_bench --prefills 8k --batches 1 --reps 3 --out "$OUT/hf_bench.json"
echo "== end $(date -u)" | tee -a "$L"
