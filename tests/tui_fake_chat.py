"""``python -m tests.tui_fake_chat [--delay S] [ARGS]``: ``moecoder chat`` on the scripted engine.

The product's ``tui.app.main`` given :class:`tests.tui_fakes.ScriptedEngine` (canned
answers), for the real-terminal check (``tests/test_tui_tmux.py``) and screenshots.
"""

from __future__ import annotations

import sys

from tests.tui_fakes import ScriptedEngine
from tui.app import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    delay = 0.05
    if argv[:1] == ["--delay"]:
        delay, argv = float(argv[1]), argv[2:]
    sys.exit(main(argv, engine=ScriptedEngine(delay=delay)))
