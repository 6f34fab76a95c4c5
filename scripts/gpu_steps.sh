# Sourced by the device-call scripts (scripts/gpu_measure.sh, scripts/gpu_tma_ab.sh): the log header (GPU, date,
# commit, versions) in $OUT/measure.log and `step SECONDS NAME COMMAND...`, which runs one step under its own time
# limit, its whole output in $OUT/NAME.log and its tail in the main log (a call cut off keeps the finished steps).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
L=$OUT/measure.log
{ echo "== $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) $(date -u) $(git log --oneline -1 2>/dev/null | cut -c1-70)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$L"
step() {  # step SECONDS NAME COMMAND...
  local s=$1 n=$2; shift 2
  echo "== $n ($(date -u +%T))" | tee -a "$L"
  timeout "$s" "$@" 2>&1 | tee "$OUT/$n.log" | tail -40 >> "$L"
}
