"""`moecoder chat`'s command line, importable without Textual or torch (fast `--help`)."""

from __future__ import annotations

import argparse

HELP_EPILOG = """\
The chat streams each answer in two parts: the model's reasoning first (dim, in a
collapsible block that folds itself when the answer starts), then the answer as
Markdown with highlighted code.

commands (type them in the prompt):
  /add PATH          attach a file (text, up to 2 MB); the side panel shows the
                     context budget: tokens used of the model's limit, what was trimmed
  /drop PATH         detach a file            /files   list attached files
  /complete FILE:LINE  complete the code at the end of LINE (1-based)
  /comment FUNC      write a docstring for FUNC (defined in an attached file)
  /debug [FUNC]      look for a bug in FUNC, or in the last attached file
  /explain [FILE[:A-B]]  explain a file or lines A-B
  /clear             start a new conversation (the old one stays saved)
  /model PATH        load another checkpoint directory
  /help              list the commands
  Other text is a question: with files attached it goes to debug (bug, fix, wrong...),
  comment (docstring) or explain; without files it is explained as code.

keys:
  Enter send · Ctrl+J new line · Up/Down prompt history · Esc stop the answer ·
  Ctrl+R show/fold reasoning · Ctrl+B files panel · Ctrl+P command palette (themes) ·
  Ctrl+Q quit

Conversations are saved as JSON in $MOECODER_DATA_DIR, else $XDG_DATA_HOME/moecoder,
else ~/.local/share/moecoder (folder conversations/); --resume reopens the newest.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moecoder chat",
        description="Chat about code in the terminal with the local moecoder model.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="*", metavar="FILES", help="files to attach at start")
    p.add_argument("--resume", action="store_true", help="reopen the most recent conversation")
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the shipped model)")
    p.add_argument("--device", help="torch device (default: the config file's, else cpu)")
    p.add_argument("--server", metavar="URL", help="use a running `moecoder serve` at URL instead of loading the model")
    return p
