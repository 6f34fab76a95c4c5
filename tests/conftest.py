"""Shared fixtures: a tiny tokenizer and a tiny model, built in seconds on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# One decision for the whole session, made before any test module imports ``kernels``:
# without CUDA the Triton kernels run in the interpreter. It is process-wide (``triton.jit``
# reads it when a kernel is defined), so no single test module may set it for the others.
if "TRITON_INTERPRET" not in os.environ and _no_cuda():
    os.environ["TRITON_INTERPRET"] = "1"

# The repository memory's disk cache (assistant/memory.py) is off in tests, servers started by them
# included: each test reads its project afresh and nothing is written under the user's home. The
# tests of the cache switch it on with their own directory.
os.environ["MOECODER_MEMORY_CACHE"] = "0"


# Standard-library modules whose text trains the tiny tokenizer. Not the project's own files:
# those change with every commit, and with them the tokenizer and every tiny model built on it,
# so thresholds that held on one commit failed on the next.
TOKENIZER_STDLIB = ("argparse", "ast", "bisect", "contextlib", "dataclasses", "difflib", "enum", "fractions",
                    "functools", "heapq", "inspect", "pprint", "shlex", "statistics", "string", "textwrap",
                    "tokenize", "typing")


def _sample_sources() -> list[Path]:
    """About 650 KB of real Python to train the tiny tokenizer: fixed standard-library modules."""
    import json
    import sysconfig

    std = Path(sysconfig.get_paths()["stdlib"])
    files = [std / f"{name}.py" for name in TOKENIZER_STDLIB] + sorted(Path(json.__file__).parent.glob("*.py"))
    return [f for f in files if f.is_file()]


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    from model.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(_sample_sources(), out, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
    from model.tokenizer import Tokenizer

    return Tokenizer.load(tiny_tokenizer_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_path) -> Path:
    import dataclasses

    import torch

    from model.checkpoint import export
    from model.config import get_preset
    from model.transformer import Transformer

    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=512)
    model = Transformer(cfg)
    out = tmp_path_factory.mktemp("tiny_model")
    export(model, cfg, tiny_tokenizer_path, out)
    return out


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable
