#!/usr/bin/env bash
# Real-terminal check of `moecoder chat` (the same steps as tests/test_tui_tmux.py):
# start the app in a detached tmux session, type with send-keys, read with capture-pane.
# Uses the scripted engine (python -m tests.tui_fake_chat), so no model is needed.
#   scripts/tui_tmux_check.sh            # prints the screens, exits 0 when all checks pass
set -euo pipefail

command -v tmux >/dev/null || { echo "tui_tmux_check: tmux is not installed" >&2; exit 2; }
PY=${PYTHON:-python}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
session="moecoder-check-$$"
cleanup() { tmux kill-session -t "$session" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

printf 'def add(a, b):\n    return a - b\n' > "$work/calc.py"

wait_for() {  # wait_for TEXT: poll the screen until TEXT shows (30 s at most)
    for _ in $(seq 150); do
        if tmux capture-pane -t "$session" -p | grep -qF -- "$1"; then return 0; fi
        sleep 0.2
    done
    echo "FAIL: never saw '$1' on the screen:" >&2
    tmux capture-pane -t "$session" -p >&2
    exit 1
}

wait_gone() {  # wait_gone TEXT: poll the screen until TEXT is gone (30 s at most)
    for _ in $(seq 150); do
        if ! tmux capture-pane -t "$session" -p | grep -qF -- "$1"; then return 0; fi
        sleep 0.2
    done
    echo "FAIL: '$1' stayed on the screen" >&2
    exit 1
}

tmux new-session -d -s "$session" -x 100 -y 30 \
    "cd '$work' && env MOECODER_DATA_DIR='$work/data' PYTHONPATH='$root' \
     $PY -m tests.tui_fake_chat --delay 0.25 calc.py"

wait_for "Context budget"
echo "ok: app started, calc.py attached with its budget report"

tmux send-keys -t "$session" -l "what does add do"
tmux send-keys -t "$session" Enter
wait_for "Reasoning"
wait_for "return a + b"
wait_gone "answering"
tmux capture-pane -t "$session" -p
echo "ok: reasoning then answer"

tmux send-keys -t "$session" -l "again"
tmux send-keys -t "$session" Enter
wait_for "thinking"
tmux send-keys -t "$session" Escape
wait_for "■ stopped"
echo "ok: Escape stopped the running answer"

tmux send-keys -t "$session" -l "/add nothing.py"
tmux send-keys -t "$session" Enter
wait_for "no such file: nothing.py"
echo "ok: bad input shows a message, the app keeps running"

tmux send-keys -t "$session" C-q
for _ in $(seq 50); do tmux has-session -t "$session" 2>/dev/null || break; sleep 0.2; done
if tmux has-session -t "$session" 2>/dev/null; then echo "FAIL: Ctrl+Q did not quit" >&2; exit 1; fi
ls "$work/data/conversations/"*.json >/dev/null
echo "ok: quit with Ctrl+Q, conversation saved"
echo "all checks passed"
