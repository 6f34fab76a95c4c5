"""``python -m tests.lsp_tiny_model OUT [--preset small --tokenizer TOK]``: a random-weight model.

By default the tests' tiny model; with ``--preset small --tokenizer model/weights/tokenizer.model``
the shipped architecture with random weights (speed does not depend on the weights).

For running ``python -m lsp.bench --model OUT`` before a shipped model exists (the lsp
package may not import ``model``; this helper lives with the tests, which may).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path


def build(out: Path, preset: str = "tiny", tokenizer: Path | None = None) -> Path:
    import torch

    from model.checkpoint import export
    from model.config import get_preset
    from model.tokenizer import Tokenizer, train_tokenizer
    from model.transformer import Transformer
    from tests.conftest import _sample_sources

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_tokenizer(_sample_sources(), out / "_tokenizer" / "tokenizer", vocab_size=512)
    vocab = Tokenizer.load(tokenizer).vocab_size
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset(preset), vocab_size=vocab)
    export(Transformer(cfg), cfg, tokenizer, out / "model")
    return out / "model"


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.lsp_tiny_model")
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="tiny", help="model preset (tiny, small, ...); random weights")
    p.add_argument("--tokenizer", type=Path, help="tokenizer .model (default: train the tests' 512-piece one)")
    a = p.parse_args()
    print(build(a.out, a.preset, a.tokenizer))
