#!/usr/bin/env bash
# Train the shipped model on the GPU machine in chained calls (each <= 9.5 minutes).
# Usage (from the repo root on the GPU machine): scripts/gpu_train.sh MINUTES [EXTRA TRAIN ARGS...]
# Data is built once per machine under $WORK (kept while the machine stays warm);
# training state resumes from $WORK/run's last complete DCP checkpoint.
set -euo pipefail
MINUTES=${1:-8}; shift || true
WORK=${WORK:-/tmp/moecoder}
OUT=${OUT:-$WORK/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
mkdir -p "$WORK" "$OUT"
TOK=model/weights/tokenizer.model
ROOTS=$($PY -c "import site,sysconfig; print(' '.join([*site.getsitepackages(), sysconfig.get_paths()['stdlib']]))")
if [ ! -f "$WORK/packed/meta.json" ]; then
  echo "== corpus over $ROOTS"; date
  $PY -m assistant.cli data corpus $ROOTS --out "$WORK/corpus" --eval-dir .carry/eval 2>&1 | tail -40
  echo "== pack"; date
  $PY -m assistant.cli data pack "$WORK/corpus" --tokenizer $TOK --out "$WORK/packed" 2>&1 | tail -20
  echo "== tasks"; date
  $PY -m assistant.cli data tasks "$WORK/corpus" --tokenizer $TOK --out "$WORK/tasks" 2>&1 | tail -20
  date
fi
cp "$WORK/corpus/report.json" "$OUT/corpus_report.json" 2>/dev/null || true
cp "$WORK/packed/meta.json" "$OUT/packed_meta.json" 2>/dev/null || true
cp "$WORK/tasks/meta.json" "$OUT/tasks_meta.json" 2>/dev/null || true
echo "== train"; date
$PY -m assistant.cli train --preset small --device cuda --data "$WORK/packed" --task-data "$WORK/tasks" \
   --out "$WORK/run" --max-minutes "$MINUTES" --resume "$@" 2>&1 | grep -v '\r' | tail -60 || true
cp "$WORK/run/metrics.jsonl" "$WORK/run/train.log" "$OUT/" 2>/dev/null || true
if [ -d "$WORK/run/best" ]; then
  mkdir -p "$OUT/best"
  for f in "$WORK/run/best"/*; do
    if [ $(stat -c %s "$f") -gt 15000000 ]; then split -b 15000000 -d "$f" "$OUT/best/$(basename "$f").part"; else cp "$f" "$OUT/best/"; fi
  done
fi
ls -la "$OUT" "$OUT/best" 2>/dev/null
