#!/usr/bin/env bash
# #14 on a machine with ONE GPU: what of the multi-GPU path can run there.
#   1. NCCL, world size 1 (torchrun, one process): collectives, FSDP2 through
#      model.parallel.parallelize, bf16 params / fp32 reduce, training steps of `small` and
#      `base`; tokens/s, MFU, memory, NCCL kernel time; loss curve vs a plain one-GPU model.
#   2. Two processes on the one GPU over NCCL (does NCCL allow it?).
#   3. Asynchronous vs synchronous DCP saves on CUDA through `moecoder train`: time training is
#      blocked per save (the train log's checkpoint lines).
# Usage (repo root on the GPU machine): bash scripts/gpu_nccl.sh   (writes under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_nccl_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
TR="$PY -m torch.distributed.run --standalone"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"; date -u; } 2>&1 | tee "$OUT/env.txt"

echo "== 1. NCCL world size 1: small, base" | tee "$OUT/nccl.log"
timeout 150 $TR --nproc-per-node 1 scripts/nccl_check.py --preset small --steps 30 --batch 16 --seq 1024 --compare \
  --json "$OUT/nccl_small_w1.json" 2>&1 | grep -v "^W1\|OMP_NUM" | tee -a "$OUT/nccl.log"
timeout 150 $TR --nproc-per-node 1 scripts/nccl_check.py --preset base --steps 12 --batch 8 --seq 1024 \
  --json "$OUT/nccl_base_w1.json" 2>&1 | grep -v "^W1\|OMP_NUM" | tee -a "$OUT/nccl.log"
echo "== 2. two processes on one GPU (NCCL)" | tee -a "$OUT/nccl.log"
timeout 90 $TR --nproc-per-node 2 scripts/nccl_check.py --preset small --ep 2 --steps 8 --batch 8 --seq 512 \
  --json "$OUT/nccl_small_w2_one_gpu.json" 2>&1 | grep -v "^W1\|OMP_NUM" | grep -v "^\s*File\|^    \|^\[\|^---\|^===\|^  " | head -40 | tee -a "$OUT/nccl.log"

echo "== 3. async vs sync DCP saves on CUDA (small)" | tee "$OUT/ckpt.log"
D=/tmp/nccl_data
STD=$($PY -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
if [ ! -f "$D/packed/meta.json" ]; then
  $PY -m assistant.cli data corpus "$STD" --exclude site-packages --out "$D/corpus" --workers 16 -q 2>&1 | tail -3
  $PY -m assistant.cli data pack "$D/corpus" --tokenizer model/weights/tokenizer.model --out "$D/packed" --workers 16 -q 2>&1 | tail -3
fi
for mode in off on; do
  rm -rf "$D/run_$mode"
  timeout 150 $PY -m assistant.cli train --preset small --device cuda --data "$D/packed" --out "$D/run_$mode" \
    --max-steps 80 --ckpt-every 20 --eval-every 1000 --log-every 10 --batch-size 16 --seq-len 1024 \
    --warmup-steps 10 --async-ckpt $mode 2>&1 | tr '\r' '\n' | grep -i "checkpoint\|step 80\|tok/s\|error\|done" \
    | tail -20 | sed "s/^/[async=$mode] /" | tee -a "$OUT/ckpt.log"
done
ls -la "$OUT"
