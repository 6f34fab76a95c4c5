#!/usr/bin/env bash
# moecoder serve on the GPU machine (#13): server tokens/s of the shipped model at 1, 8 and 32
# concurrent streaming clients, one process (--ep 1), greedy, loopback; every response at 8 and
# 32 is checked against the same prompt's response alone (level 1). With 2+ GPUs visible it also
# runs --ep 2 under torchrun (experts sharded over 2 GPUs, NCCL).
#
# The device image lacks fastapi/starlette/uvicorn/pydantic/opentelemetry-api/tree-sitter/cattrs: they
# travel as 14 cp312 wheels (4 MiB) in /work/main/.gpu/h13-whl (pip download, same versions as
# /work/venv). From /work/main:
#   run(carry=[".gpu/h13-whl"], timeout_s=420, command="bash scripts/gpu_serve.sh")
# Writes under $OUT: env.txt, ep1.log + ep1.json (and ep2.log + ep2.json + ep2-server.log
# with 2 GPUs), summary.txt. REQ (requests per level, default 48) and MAXTOK (default 64) tune it.
# Two processes on ONE GPU are not run: NCCL refuses two ranks on one device, and a host-staged
# (gloo) exchange would measure the copy, not the experts.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_serve_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# autotuning every new batch shape costs more than the run (the lead's 18:59 run: off)
export MOECODER_TRITON_AUTOTUNE=${MOECODER_TRITON_AUTOTUNE:-0}
WHL=${WHL:-.gpu/h13-whl}
PY=${PY:-python3}
if compgen -G "$WHL/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/h13site "$WHL"/*.whl \
    && export PYTHONPATH="/tmp/h13site:$PYTHONPATH" || { echo "wheel install failed" | tee "$OUT/summary.txt"; exit 1; }
fi
$PY - <<'PY' 2>&1 | tee "$OUT/env.txt"
import torch, fastapi, uvicorn, tree_sitter, cattrs, httpx
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("fastapi", fastapi.__version__, "uvicorn", uvicorn.__version__, "httpx", httpx.__version__)
PY
[ "${PIPESTATUS[0]}" = 0 ] || { echo "environment check failed (see env.txt)" | tee "$OUT/summary.txt"; exit 1; }
DEVICE=${DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())')
REQ=${REQ:-48}
MAXTOK=${MAXTOK:-64}
LEVELS=${LEVELS:-1,8,32}
rc=0
timeout 300 $PY -m serve.bench --device "$DEVICE" --concurrency "$LEVELS" --requests "$REQ" --max-tokens "$MAXTOK" \
  --port 8765 --out "$OUT/ep1.json" 2>&1 | tee "$OUT/ep1.log" || rc=1
if [ "$DEVICE" = cuda ] && [ "$NGPU" -ge 2 ] && [ "${EP2:-1}" = 1 ]; then
  timeout 200 $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m assistant.cli serve --ep 2 \
    --device cuda --port 8766 --name bench >"$OUT/ep2-server.log" 2>&1 &
  SRV=$!
  timeout 180 $PY -m serve.bench --url http://127.0.0.1:8766 --concurrency "$LEVELS" --requests "$REQ" \
    --max-tokens "$MAXTOK" --out "$OUT/ep2.json" 2>&1 | tee "$OUT/ep2.log" || rc=1
  kill "$SRV" 2>/dev/null; wait "$SRV" 2>/dev/null
fi
{ echo "device $DEVICE gpus $NGPU requests/level $REQ max_tokens $MAXTOK"; cat "$OUT"/ep*.log | grep concurrency; } \
  | tee "$OUT/summary.txt"
exit $rc
