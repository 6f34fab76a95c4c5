"""`moecoder lsp`'s command line, importable without pygls or torch (fast `--help`)."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecoder lsp",
                                description="Run the moecoder language server on stdio (or TCP for debugging).")
    p.add_argument("--tcp", metavar="HOST:PORT", help="listen on TCP instead of stdio (for debugging)")
    p.add_argument("--model", metavar="DIR", help="model directory (default: the shipped model)")
    p.add_argument("--device", help="torch device (default: the config file's, else cpu)")
    p.add_argument("--server", metavar="URL", help="use a running `moecoder serve` at URL instead of loading the model")
    p.add_argument("--log-file", metavar="FILE", help="write the server log to FILE (default: stderr)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p
