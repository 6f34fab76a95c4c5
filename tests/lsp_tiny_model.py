"""``python -m tests.lsp_tiny_model OUT``: the tests' tiny random-weight model, exported to OUT.

For running ``python -m lsp.bench --model OUT`` before a shipped model exists (the lsp
package may not import ``model``; this helper lives with the tests, which may).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path


def build(out: Path) -> Path:
    import torch

    from model.checkpoint import export
    from model.config import get_preset
    from model.tokenizer import train_tokenizer
    from model.transformer import Transformer
    from tests.conftest import _sample_sources

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(_sample_sources(), out / "_tokenizer" / "tokenizer", vocab_size=512)
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=512)
    export(Transformer(cfg), cfg, tok, out / "model")
    return out / "model"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m tests.lsp_tiny_model OUT", file=sys.stderr)
        sys.exit(2)
    print(build(Path(sys.argv[1])))
