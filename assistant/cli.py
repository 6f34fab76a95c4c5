"""`moecoder` command line: the composition root.

Each subcommand lives in the room that owns it and exposes ``main(argv) -> int``.
This module only dispatches, importing the owner lazily so that `moecoder --help`
stays fast and a face's dependencies load only when that face runs. It is the one
module allowed to import ``lsp``, ``tui`` and ``serve``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from assistant import __version__


def _data(argv: list[str]) -> int:
    from model.data.cli import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from model.train import main

    return main(argv)


def _generate(argv: list[str]) -> int:
    from model.generate import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from model.checkpoint import main

    return main(argv)


def _review(argv: list[str]) -> int:
    from assistant.review import main

    return main(argv)


def _task(name: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        from assistant.tasks import main

        return main([name, *argv])

    return run


def _eval(argv: list[str]) -> int:
    from assistant.evaluate import main

    return main(argv)


def _watermark(argv: list[str]) -> int:
    from model.watermark import main

    return main(argv)


def _tune(argv: list[str]) -> int:
    from assistant.tune import main

    return main(argv)


def _lsp(argv: list[str]) -> int:
    from lsp.server import main

    return main(argv)


def _serve(argv: list[str]) -> int:
    from serve.server import main

    return main(argv)


def _chat(argv: list[str]) -> int:
    from tui.app import main

    return main(argv)


# `COMMAND --help` builds only the command's parser, from a module that imports neither torch
# nor Textual nor pygls (help in well under half a second); the others' modules are light already.
HELP_PARSERS: dict[str, tuple[str, str]] = {
    "chat": ("tui.args", "build_parser"),
    "lsp": ("lsp.args", "build_parser"),
    "generate": ("model.cli_args", "generate_parser"),
    "export": ("model.cli_args", "export_parser"),
    "train": ("model.train", "_parser"),
    "watermark": ("model.cli_args", "watermark_parser"),
}


def _fast_help(name: str, rest: list[str]) -> bool:
    """Print ``name``'s help without importing the command's module; False when not asked."""
    args = rest[: rest.index("--")] if "--" in rest else rest
    if name not in HELP_PARSERS or not ({"-h", "--help"} & set(args)):
        return False
    import importlib

    module, func = HELP_PARSERS[name]
    getattr(importlib.import_module(module), func)().print_help()
    return True


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "review": (_review, "review files or a git diff: debugging hints and missing docstrings"),
    "chat": (_chat, "open the terminal chat (Textual TUI)"),
    "lsp": (_lsp, "run the language server on stdio (or --tcp HOST:PORT)"),
    "serve": (_serve, "serve the model over the OpenAI HTTP API (torchrun --ep N: experts sharded)"),
    "complete": (_task("complete"), "complete code at FILE:LINE:COL (fill-in-the-middle)"),
    "comment": (_task("comment"), "write a docstring for a function, reasoning first"),
    "debug": (_task("debug"), "debugging hints for a function, reasoning first"),
    "explain": (_task("explain"), "explain a piece of code, reasoning first"),
    "generate": (_generate, "generate text from a prompt with a model (streams)"),
    "eval": (_eval, "evaluate a model on the held-out and external benchmarks"),
    "tune": (_tune, "adapt the model to one repository on the CPU (--minutes M --out DIR)"),
    "train": (_train, "train a model (one device or torchrun)"),
    "export": (_export, "export released weights from a training checkpoint"),
    "data": (_data, "build corpora, tokenizers and packed token files"),
    "watermark": (_watermark, "tell whether files were generated with a watermark key (detect)"),
}


def _parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    epilog += "\n\nRun `moecoder COMMAND --help` for a command's options."
    p = argparse.ArgumentParser(
        prog="moecoder",
        description="A local coding assistant on its own Mixture-of-Experts code model.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"moecoder {__version__}")
    p.add_argument("command", nargs="?", metavar="COMMAND", help="one of the commands below")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if args[0] == "--version":
        parser.parse_args(["--version"])
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        parser.print_usage(sys.stderr)
        print(f"moecoder: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if _fast_help(name, rest):
        return 0
    from assistant.shadow import check

    shadowed = check()
    if shadowed is not None:
        print(f"moecoder: error: {shadowed}", file=sys.stderr)
        return 2
    handler, _ = COMMANDS[name]
    try:
        code = int(handler(rest) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moecoder ... | head`: the reader has gone; no traceback, no second error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
