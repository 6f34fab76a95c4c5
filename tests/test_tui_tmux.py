"""Real-terminal check: `moecoder chat` under tmux, driven by send-keys, read by capture-pane.

Uses the scripted engine (``python -m tests.tui_fake_chat``) so it needs no model; skipped
without tmux. The same check as a script: scripts/tui_tmux_check.sh.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True, timeout=30).stdout


def wait_screen(session: str, predicate, timeout: float = 30.0) -> str:
    end = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < end:
        screen = tmux("capture-pane", "-t", session, "-p")
        if predicate(screen):
            return screen
        time.sleep(0.2)
    raise AssertionError("screen never showed what was expected:\n" + screen)


def test_chat_in_a_real_terminal(tmp_path):
    (tmp_path / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    session = f"moecoder-tui-{uuid.uuid4().hex[:8]}"
    env = {
        "MOECODER_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(ROOT),
        "TERM": "xterm-256color",
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    cmd = f"cd {shlex.quote(str(tmp_path))} && env {exports} {shlex.quote(sys.executable)} -m tests.tui_fake_chat --delay 0.25 calc.py"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd)
    try:
        screen = wait_screen(session, lambda s: "Context budget" in s)
        assert "calc.py" in screen and "Files" in screen and "Quit" in screen
        tmux("send-keys", "-t", session, "-l", "what does add do")
        tmux("send-keys", "-t", session, "Enter")
        screen = wait_screen(session, lambda s: "return a + b" in s and "answering" not in s)
        lines = screen.splitlines()
        question = next(i for i, line in enumerate(lines) if "what does add do" in line)
        reasoning = next(i for i, line in enumerate(lines) if "Reasoning" in line)
        answer = next(i for i, line in enumerate(lines) if "Here is the answer" in line)
        assert question < reasoning < answer  # reasoning (folded) above the answer
        # a bad command leaves a message and the app running
        tmux("send-keys", "-t", session, "-l", "/frobnicate")
        tmux("send-keys", "-t", session, "Enter")
        wait_screen(session, lambda s: "unknown command /frobnicate" in s)
        # Escape stops a running answer in a real terminal (the fake waits 0.25 s per event)
        tmux("send-keys", "-t", session, "-l", "slow")
        tmux("send-keys", "-t", session, "Enter")
        wait_screen(session, lambda s: "thinking" in s or "answering" in s)
        tmux("send-keys", "-t", session, "Escape")
        wait_screen(session, lambda s: "■ stopped" in s)
        tmux("send-keys", "-t", session, "C-q")
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode != 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("ctrl+q did not quit the app")
        saved = list((tmp_path / "data" / "conversations").glob("*.json"))
        assert len(saved) == 1
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_keys_typed_while_the_chat_starts_are_kept(tmp_path):
    """Typed right after the command, before the app has drawn anything (issue #20: lost)."""
    session = f"moecoder-tui-{uuid.uuid4().hex[:8]}"
    env = {"MOECODER_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(ROOT), "TERM": "xterm-256color"}
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    cmd = f"cd {shlex.quote(str(tmp_path))} && env {exports} {shlex.quote(sys.executable)} -m tests.tui_fake_chat"
    tmux("new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd)
    try:
        tmux("send-keys", "-t", session, "-l", "typed early")
        screen = wait_screen(session, lambda s: "Quit" in s and "│ typed early" in s)
        assert screen.count("typed early") == 1
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
