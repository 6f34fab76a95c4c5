"""assistant.cli: the composition root: bare `moecoder`, fast `--help` for every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "textual", "pygls", "lsprotocol", "numpy")


def test_bare_moecoder_prints_help_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: moecoder" in out and all(name in out for name in COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_imports_nothing_heavy(name):
    """`moecoder COMMAND --help` prints the command's options without importing torch, Textual or
    pygls (the 2-4 s that made `--help` slow)."""
    code = ("import atexit, sys; "
            f"atexit.register(lambda: print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))); "
            "from assistant.cli import main; sys.exit(main([sys.argv[1], '--help']))")
    r = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert f"usage: moecoder {name}" in r.stdout
    heavy = r.stdout.rsplit("HEAVY", 1)[1].strip()
    allowed = "['numpy']" if name in ("train", "data") else "[]"  # train's defaults come from its config
    assert heavy in ("[]", allowed), (name, heavy)


def test_train_help_shows_each_default_once(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out
    opts = out[out.index("options:"):]
    block = opts[opts.index("--tokenizer"):opts.index("--resume")]
    assert block.count("default") == 1, block


def test_a_closed_pipe_is_no_traceback():
    """`moecoder data --help | head -1`: the reader leaves before the output is written; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "assistant.cli", "data", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # before the child writes a byte
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"Exception ignored" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode == 0
