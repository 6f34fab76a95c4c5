#!/usr/bin/env bash
# Train the shipped model on the GPU machine in chained calls (each <= 9.5 minutes).
# Usage (from the repo root on the GPU machine): scripts/gpu_train.sh SECONDS [EXTRA TRAIN ARGS...]
# SECONDS is the whole call's budget: data building (first call on a machine) comes out of it.
# Data is built once per machine under $WORK (kept while the machine stays warm);
# training state resumes from $WORK/run's last complete DCP checkpoint.
# Continue from released weights (a fresh optimizer, warmup-stable-decay), e.g.:
#   MAX_STEPS=560 scripts/gpu_train.sh 430 --init model/weights --schedule wsd --decay-frac 0.35 \
#       --lr 6e-4 --min-lr-ratio 0.02 --warmup-steps 40 --eval-every 80
# REPO_FIM=N adds N completion examples with repository context (model.data.repo_fim) to the task data.
# More source than one call can carry (64 MiB with the working tree): first, on a fresh machine,
#   UNPACK_ONLY=1 bash scripts/gpu_train.sh 60        (run's carry: [".carry_pre"], the archives that do not fit)
# then, within the warm window, the training call (carry: [".carry"]): the corpus takes every unpacked
# $WORK/extra*/ directory.
set -euo pipefail
BUDGET_S=${1:-540}; shift || true
START=$(date +%s)
WORK=${WORK:-/tmp/moecoder}
OUT=${OUT:-$WORK/out}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=python3
mkdir -p "$WORK" "$OUT"
TOK=${TOK:-model/weights/tokenizer.model}  # e.g. ../../model/weights/tokenizer.model from a copy under .gpu/
ROOTS=$($PY -c "import os,site,sysconfig; print(' '.join(p for p in [*site.getsitepackages(), sysconfig.get_paths()['stdlib']] if os.path.isdir(p)))")
# .carry/extra*_py.tar.xz (optional): more Python source carried in from the development machine
# (packages the GPU machine lacks; held-out evaluation packages excluded; scripts/build_extra.py), each
# archive one directory under $WORK (NAME_py.tar.xz holds NAME/) and one more corpus root.
for arc in .carry/extra*_py.tar.xz .carry_pre/extra*_py.tar.xz .carry_pre2/extra*_py.tar.xz; do
  [ -f "$arc" ] || continue
  top=$(basename "$arc" _py.tar.xz)  # extra_py.tar.xz holds extra/, extra2_py.tar.xz extra2/ (build_extra.py --arcname)
  if [ ! -d "$WORK/$top" ]; then
    tar -xJf "$arc" -C "$WORK" && echo "== extra source $arc: $(du -sh "$WORK/$top" | cut -f1)"
  fi
done
# every unpacked source directory counts, also those an earlier call on this warm machine carried in (the
# device takes at most 64 MiB a call: more archives than fit come in earlier calls, e.g. `UNPACK_ONLY=1`)
for d in "$WORK"/extra*/; do [ -d "$d" ] && ROOTS="$ROOTS ${d%/}"; done
[ -n "${UNPACK_ONLY:-}" ] && { echo "== unpacked: $(ls -d "$WORK"/extra*/ 2>/dev/null | tr '\n' ' ')"; exit 0; }
if [ ! -f "$WORK/packed/meta.json" ]; then
  echo "== corpus over $ROOTS"; date
  $PY -m assistant.cli data corpus $ROOTS --out "$WORK/corpus" --eval-dir .carry/eval --workers 16 -q 2>&1 | tail -40
  echo "== pack"; date
  $PY -m assistant.cli data pack "$WORK/corpus" --tokenizer $TOK --out "$WORK/packed" --workers 16 -q 2>&1 | tail -20
  echo "== tasks"; date
  $PY -m assistant.cli data tasks "$WORK/corpus" --tokenizer $TOK --out "$WORK/tasks" --workers 16 \
      --max-functions ${MAX_FUNCTIONS:-120000} --eval-dir .carry/eval 2>&1 | tail -8
  date
fi
TASKS="$WORK/tasks"
if [ -n "${REPO_FIM:-}" ]; then  # completion examples with repository context, appended to the task data
  if [ ! -f "$WORK/tasks_repo/meta.json" ]; then
    echo "== repository-context examples"; date
    $PY -m model.data.repo_fim "$WORK/corpus" --tokenizer $TOK --tasks "$WORK/tasks" --out "$WORK/tasks_repo" \
        --examples $REPO_FIM --workers 16 | tee "$OUT/repo_fim.json"
  fi
  TASKS="$WORK/tasks_repo"
fi
[ -n "${COPY_REPORTS:-}" ] && cp "$WORK/corpus/report.json" "$OUT/corpus_report.json" 2>/dev/null || true
[ -n "${COPY_REPORTS:-}" ] && cp "$WORK/packed/meta.json" "$OUT/packed_meta.json" 2>/dev/null || true
[ -n "${COPY_REPORTS:-}" ] && cp "$WORK/tasks/meta.json" "$OUT/tasks_meta.json" 2>/dev/null || true
MINUTES=$(python3 -c "print(round(max(0.5, ($BUDGET_S - ($(date +%s) - $START) - 80) / 60), 2))")
echo "== train for $MINUTES minutes"; date
RUN=${RUN:-$WORK/run}
$PY -m assistant.cli train --preset small --device cuda --data "$WORK/packed" --task-data "$TASKS" \
   --out "$RUN" --max-minutes "$MINUTES" --resume \
   --override max_seq_len=1024 --seq-len 1024 --batch-size 64 --grad-accum 4 \
   --max-steps ${MAX_STEPS:-2400} --warmup-steps 150 --eval-every 200 --eval-tokens 524288 --log-every 25 \
   "$@" 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -80 || true
WORK_RUN=$RUN
cp "$RUN/metrics.jsonl" "$OUT/${METRICS_NAME:-metrics.jsonl}" 2>/dev/null || true
cp "$RUN/best_info.json" "$OUT/" 2>/dev/null || true
if [ -d "$RUN/best" ] && [ -z "${NO_BEST:-}" ]; then
  # the best-by-validation model, stored int8 (<= 40 MiB), split into <= 15 MB parts for the trip back
  rm -rf "$WORK/ship"
  $PY -c "
from model.checkpoint import load_model, export
m = load_model('$RUN/best')
export(m.model, m.config, '$RUN/best/tokenizer.model', '$WORK/ship', int8=True)
"
  mkdir -p "$OUT/ship"
  for f in "$WORK/ship"/model.safetensors "$WORK/ship"/config.json; do
    if [ $(stat -c %s "$f") -gt 15000000 ]; then split -b 15000000 -d "$f" "$OUT/ship/$(basename "$f").part"; else cp "$f" "$OUT/ship/"; fi
  done
fi
ls -la "$OUT" "$OUT/ship" 2>/dev/null; nvidia-smi --query-gpu=name,memory.used --format=csv
