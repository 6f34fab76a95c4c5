#!/usr/bin/env python
"""Plot the validation curves of a MoE run and a dense run side by side (docs/dense-vs-moe.png).

    python scripts/plot_dense_vs_moe.py MOE_RUN DENSE_RUN [--out docs/dense-vs-moe.png] [--force]
    python scripts/plot_dense_vs_moe.py twin PRESET   # the dense twin's train overrides

Each RUN is a ``moecoder train`` output directory or its ``metrics.jsonl``. Validation records
(``step``, ``valid_bpb``, ``valid_loss``) are placed on a tokens axis using the training records
(``step``, ``tokens``) of the same file. Left panel: validation bits per byte against training
tokens; right panel: validation loss (nats/token) against step. The active parameter counts are
read from ``train.log`` next to the metrics when present. Needs matplotlib (``pip install
'moecoder[plot]'``); prints the final numbers as text too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Curve:
    path: Path
    steps: list[int] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    bpb: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    active: str | None = None  # e.g. "23.5M active"


def _metrics_path(p: Path) -> Path:
    return p / "metrics.jsonl" if p.is_dir() else p


def load_curve(path: str | Path) -> Curve:
    """Validation points of one run; ValueError (one line) if the file has none."""
    mp = _metrics_path(Path(path))
    if not mp.is_file():
        raise ValueError(f"{mp}: no such metrics file")
    train: list[tuple[int, int]] = []
    valid: list[dict] = []
    for n, line in enumerate(mp.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{mp}:{n}: not JSON") from None
        if "valid_bpb" in rec or "valid_loss" in rec:
            valid.append(rec)
        elif "tokens" in rec and "step" in rec:
            train.append((int(rec["step"]), int(rec["tokens"])))
    if not valid:
        raise ValueError(f"{mp}: no validation records (valid_bpb / valid_loss)")
    train.sort()
    c = Curve(mp)
    for rec in sorted(valid, key=lambda r: r.get("step", 0)):
        step = int(rec.get("step", 0))
        c.steps.append(step)
        c.tokens.append(tokens_at(train, step) if "tokens" not in rec else float(rec["tokens"]))
        c.bpb.append(float(rec.get("valid_bpb", float("nan"))))
        c.loss.append(float(rec.get("valid_loss", float("nan"))))
    log = mp.parent / "train.log"
    if log.is_file():
        m = re.findall(r"\(active ([\d.]+M)\)", log.read_text(encoding="utf-8", errors="replace"))
        if m:
            c.active = f"{m[-1]} active"
    return c


def tokens_at(train: list[tuple[int, int]], step: int) -> float:
    """Training tokens seen at ``step``: interpolated between training records (linear past the ends)."""
    if not train:
        return float("nan")
    if step <= 0:
        return 0.0
    prev = (0, 0)
    for s, t in train:
        if s == step:
            return float(t)
        if s > step:
            s0, t0 = prev
            return t0 + (t - t0) * (step - s0) / (s - s0)
        prev = (s, t)
    s, t = train[-1]
    return t * step / s if s else float("nan")


def summary(curves: dict[str, Curve]) -> str:
    rows = [f"{'run':<28} {'points':>6} {'last step':>9} {'tokens':>14} {'valid bpb':>9} {'best bpb':>9}"]
    for label, c in curves.items():
        best = min((b for b in c.bpb if b == b), default=float("nan"))
        rows.append(
            f"{label:<28} {len(c.steps):>6} {c.steps[-1]:>9} {c.tokens[-1]:>14,.0f} {c.bpb[-1]:>9.4f} {best:>9.4f}"
        )
    return "\n".join(rows)


def plot(curves: dict[str, Curve], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for (label, c), style in zip(curves.items(), ("-o", "--s")):
        ax1.plot(c.tokens, c.bpb, style, markersize=3, label=label)
        ax2.plot(c.steps, c.loss, style, markersize=3, label=label)
    ax1.set_xlabel("training tokens")
    ax1.set_ylabel("validation bits per byte")
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation loss (nats / token)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)


def dense_twin(preset: str) -> tuple[dict, int, int]:
    """Overrides that turn ``preset`` into a dense model with (nearly) the same active parameters.

    Every layer becomes a dense SwiGLU block of one hidden size, chosen so that the dense model's
    parameter count equals the MoE's active count; per-token FLOPs then match too (the router's
    are negligible), so equal steps x batch x sequence length is equal compute.
    Returns (overrides, MoE active params, dense params).
    """
    import dataclasses

    from model.config import get_preset, param_counts

    cfg = get_preset(preset)
    _, active = param_counts(cfg)
    base = dataclasses.replace(cfg, n_dense_layers=cfg.n_layers, dense_hidden=1)
    per_unit = param_counts(dataclasses.replace(base, dense_hidden=2))[0] - param_counts(base)[0]
    hidden = max(1, round(1 + (active - param_counts(base)[0]) / per_unit))
    dense = dataclasses.replace(base, dense_hidden=hidden)
    return {"n_dense_layers": cfg.n_layers, "dense_hidden": hidden}, active, param_counts(dense)[0]


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["twin"]:
        return twin_main(argv[1:])
    p = argparse.ArgumentParser(prog="plot_dense_vs_moe.py", description=__doc__.split("\n")[0],
                                epilog="`plot_dense_vs_moe.py twin PRESET` prints the dense twin's overrides.")  # fmt: skip
    p.add_argument("moe", help="MoE run directory or its metrics.jsonl")
    p.add_argument("dense", help="dense run directory or its metrics.jsonl")
    p.add_argument("--out", default="docs/dense-vs-moe.png")
    p.add_argument("--labels", nargs=2, metavar=("MOE", "DENSE"), default=None)
    p.add_argument("--title", default="MoE vs dense at equal active parameters and compute")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    try:
        moe, dense = load_curve(args.moe), load_curve(args.dense)
    except ValueError as e:
        print(f"plot_dense_vs_moe: error: {e}", file=sys.stderr)
        return 2
    labels = args.labels or [f"MoE ({moe.active})" if moe.active else "MoE",
                             f"dense ({dense.active})" if dense.active else "dense"]  # fmt: skip
    curves = {labels[0]: moe, labels[1]: dense}
    print(summary(curves))
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"plot_dense_vs_moe: error: {out} exists (pass --force to replace it)", file=sys.stderr)
        return 2
    try:
        plot(curves, out, args.title)
    except ImportError:
        print(
            "plot_dense_vs_moe: error: matplotlib is not installed (pip install 'moecoder[plot]')",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {out}")
    return 0


def twin_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="plot_dense_vs_moe.py twin", description="the dense twin of a preset")
    p.add_argument("preset", help="model preset (tiny, small, base)")
    args = p.parse_args(argv)
    try:
        overrides, active, dense = dense_twin(args.preset)
    except ValueError as e:
        print(f"plot_dense_vs_moe: error: {e}", file=sys.stderr)
        return 2
    flags = " ".join(f"--override {k}={v}" for k, v in overrides.items())
    print(
        f"{args.preset}: MoE active {active / 1e6:.2f}M; dense twin {dense / 1e6:.2f}M ({dense / active - 1:+.2%})"
    )
    print(f"moecoder train --preset {args.preset} {flags} ...  (same data, steps, batch and seq len)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
