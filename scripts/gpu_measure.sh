#!/usr/bin/env bash
# One device call that measures what issues #12 and #18 still need, in order of importance, each step
# with its own time limit; a call cut off at its limit still returns the finished steps' logs (under $OUT, 8 files).
#   bash scripts/gpu_measure.sh            # on the GPU machine, from the repository root (QUICK=1: shorter)
# 1. GPU tests of the kernels that changed last (bf16), 2. the prefill switches A/B (scripts/prefill_ab.py),
# 3. open checkpoints vs transformers (model.hf_bench: prefill 2k/8k, decode b1/b8/b64),
# 4. the MoE layer (kernels.bench: fwd+bwd and decode vs torch._grouped_mm and the HBM floor), 5. its breakdown.
. "$(dirname "$0")/gpu_steps.sh"  # the log header and step()
MOECODER_TRITON_AUTOTUNE=0 step 150 tests python3 -m pytest -q -x tests/test_decode_kernels.py tests/test_kernels.py \
  tests/test_fused_decode.py -k "router or mla or two_deltas or moe_experts or grouped or layer_random or plan or fused_norms"
step 120 prefill_ab python3 scripts/prefill_ab.py deepseek-v2-lite,qwen3-30b-a3b 8192
if [ -n "${QUICK:-}" ]; then  # QUICK=1: the issues' figures only (8k prefill and decode b1 vs transformers, the
  # MoE layer at 16k tokens and T=1,8), about 7 minutes where the whole run is more than ten
  step 200 hf_bench python3 -m model.hf_bench --prefills 8k --batches 1 --reps 3 --out "$OUT/hf_bench.json"
  step 100 kernels_bench python3 -m kernels.bench --tokens 16384 --decode 1,8 --paths triton,grouped_mm \
    --json "$OUT/kernels_bench.json"
else
  step 270 hf_bench python3 -m model.hf_bench --reps 3 --out "$OUT/hf_bench.json"
  step 150 kernels_bench python3 -m kernels.bench --paths triton,grouped_mm,dense --json "$OUT/kernels_bench.json"
  step 60 breakdown python3 -m kernels.bench --shapes dsv2,qwen3 --breakdown 8192 --reps 10
fi
echo "== end $(date -u)" | tee -a "$L"
