"""Average two model directories of the same architecture, weight by weight (a "model soup"), and
write the result as a model directory every face loads with ``--model DIR``.

    python scripts/average_weights.py A B --alpha 0.5 --out DIR [--int8]

``alpha`` is B's share: each floating-point tensor is ``(1 - alpha) * A + alpha * B``, computed in
float32 from the loaded (dequantised) weights. Both models should come from one run (B continued
from A, say): weights of unrelated runs do not average into a working model. Used for the shipped
weights of 2026-12-07 (docs/model-card.md): a continuation that modelled held-out code better but
completed lines slightly worse, averaged with the weights it started from.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class AverageError(Exception):
    """One-line usage error (exit 2)."""


def average_state(a: dict, b: dict, alpha: float) -> dict:
    """``(1 - alpha) * a + alpha * b`` for floating tensors (in a's dtype); other tensors from ``a``."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise AverageError(f"the models differ in their tensors (e.g. {only[0]})")
    out = {}
    for k, ta in a.items():
        tb = b[k]
        if ta.shape != tb.shape:
            raise AverageError(f"{k}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
        out[k] = (ta.float() * (1 - alpha) + tb.float() * alpha).to(ta.dtype) if ta.is_floating_point() else ta
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="model directory A (its config and tokenizer are kept)")
    p.add_argument("b", help="model directory B (same architecture)")
    p.add_argument("--alpha", type=float, default=0.5, help="B's share, 0..1 (default 0.5)")
    p.add_argument("--out", required=True, help="new model directory")
    p.add_argument("--int8", action="store_true", help="store int8 per-channel, as the shipped model")
    args = p.parse_args(argv)
    from model.checkpoint import CheckpointError, export, load_model

    try:
        if not 0.0 <= args.alpha <= 1.0:
            raise AverageError(f"--alpha must be within 0..1, got {args.alpha}")
        if Path(args.out).exists():
            raise AverageError(f"{args.out} exists")
        ma, mb = load_model(args.a), load_model(args.b)
        if ma.config != mb.config:
            raise AverageError("the models' configs differ")
        ma.model.load_state_dict(average_state(ma.model.state_dict(), mb.model.state_dict(), args.alpha))
        tok = Path(args.a) / "tokenizer.model"
        export(ma.model, ma.config, tok, args.out, int8=args.int8)
    except (AverageError, CheckpointError) as e:
        print(f"average_weights: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {1 - args.alpha:g} x {args.a} + {args.alpha:g} x {args.b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
