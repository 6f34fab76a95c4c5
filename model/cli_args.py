"""Command lines of the model's commands, importable without torch so that `--help` is fast.

``moecoder generate|export|train --help`` build their parser from here; the commands themselves
(``model.generate``, ``model.checkpoint``, ``model.train``) import torch only when they run.
"""

from __future__ import annotations

import argparse


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecoder generate", description="Generate text from a prompt (streams).")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model/weights/)")
    p.add_argument("--prompt", required=True, help="prompt text ('-' reads stdin); with --fim-suffix the prefix")
    p.add_argument("--fim-suffix", default=None,
                   help="fill in the middle between --prompt and this suffix (the middle ends at end-of-text, where "
                        "the suffix begins, at the end of the line when the cursor is inside one, or where the "
                        "block ends)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--loop-guard", type=int, default=8, metavar="N",
                   help="never repeat a unit of up to N tokens three times in a row (default 8; 0: off)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16", "int8", "int4"],
                   help="open checkpoints: weights dtype at load (default $MOECODER_DTYPE, else fp32 on CPU)")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecoder export",
                                description="Export released weights (safetensors) from a training checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="training output dir (newest complete ckpt/step_*) or one step_* directory")
    p.add_argument("--out", required=True, help="new model directory (an existing model is never replaced)")
    p.add_argument("--int8", action="store_true", help="int8 per-channel weights + fp16 scales")
    p.add_argument("--int4", action="store_true",
                   help="routed experts group-wise int4, the rest int8 (model/quant.py; smaller file, same CPU speed)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"], help="storage dtype without --int8")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the one recorded in the checkpoint)")
    return p


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--dp-replicate / --dp-shard / --ep for ``moecoder train`` (used under torchrun)."""
    p.add_argument("--dp-replicate", type=int, default=1,
                   help="data-parallel replicas (HSDP: parameters replicated across groups of --dp-shard ranks)")
    p.add_argument("--dp-shard", type=int, default=-1,
                   help="ranks that FSDP-shard the parameters (-1: world size / --dp-replicate)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (divides --dp-shard and n_experts)")


def watermark_parser() -> argparse.ArgumentParser:
    """``moecoder watermark detect`` (model/watermark.py; its defaults are tested to agree)."""
    p = argparse.ArgumentParser(prog="moecoder watermark",
                                description="Watermark tools: detect text generated with a watermark key.")
    d = p
    d.add_argument("cmd", choices=["detect"], help="detect: score files (or their functions) for a key's watermark")
    d.add_argument("files", nargs="+", metavar="FILE")
    d.add_argument("--key", required=True, help="the watermark key (the `watermark.key` setting)")
    d.add_argument("--per-function", action="store_true", help="one result per function (def) instead of per file")
    d.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    d.add_argument("--entropy", choices=("model", "rule", "none"), default="model",
                   help="which tokens to score: model = recompute entropies with the model (default); "
                        "rule = skip whitespace/punctuation tokens; none = all")
    d.add_argument("--min-entropy", type=float, default=1.0, help="nats, for --entropy model (default 1.0)")
    d.add_argument("--min-tokens", type=int, default=24,
                   help="fewer scored tokens = too short to tell (default 24)")
    d.add_argument("--alpha", type=float, default=0.01, help="p-value threshold for 'watermarked' (default 0.01)")
    d.add_argument("--context", type=int, default=4, help="H used at generation")
    d.add_argument("--layers", type=int, default=16, help="tournament rounds used at generation")
    d.add_argument("--json", action="store_true", help="one JSON object per result")
    d.add_argument("--threads", type=int, default=None)
    return p
