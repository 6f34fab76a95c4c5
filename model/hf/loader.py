"""Load a Hugging Face-format MoE checkpoint directory into our Transformer.

Weights stream shard by shard (``model.safetensors.index.json`` or one ``model.safetensors``):
each shard is memory-mapped (``safe_open``), every tensor is converted to the target dtype
and copied straight into its slot of the model, which was allocated once on the target
device — so there are never two full copies in memory. Per-expert tensors are stacked into
our grouped layout ([E, D, F] / [E, F, D]) as they arrive; DeepSeek's interleaved rotary
rows are permuted into rotate-half order. ``int8``/``int4`` quantise each tensor as it
arrives (weight-only, for CPU).

Every problem is an ``HFError`` with one line: missing config/shard/tokenizer, an unknown
architecture or option, a tensor with an unexpected name or shape, a corrupt file, tensors
missing after all shards were read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn

from model.hf.families import Family, HFError, Target, family_from_config, map_name, permute_rope_rows
from model.hf.quant import QuantExperts, QuantLinear
from model.layers import SwiGLU
from model.transformer import Transformer

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "int8": 8, "int4": 4}


def is_hf_dir(path) -> bool:
    """A directory whose config.json names Hugging Face ``architectures``."""
    p = Path(path) / "config.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "architectures" in meta and "format" not in meta


def read_hf_config(d: Path) -> dict:
    path = d / "config.json"
    if not d.is_dir():
        raise HFError(f"model directory not found: {d}")
    if not path.is_file():
        raise HFError(f"not a model directory (no config.json): {d}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise HFError(f"{path}: not a JSON object")
    return meta


def weight_files(d: Path) -> list[Path]:
    """The safetensors shards in index order; HFError naming a missing one."""
    index = d / INDEX
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(wmap.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HFError(f"{index}: not a safetensors index (no weight_map)") from None
        files = [d / n for n in names]
        for f in files:
            if not f.is_file():
                raise HFError(f"missing shard {f.name} (listed in {INDEX})")
        return files
    if (d / SINGLE).is_file():
        return [d / SINGLE]
    found = sorted(d.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise HFError(f"{d}: {len(found)} safetensors files but no {INDEX}")
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise HFError(f"{d}: only pickle weights (*.bin); moecoder loads safetensors only")
    raise HFError(f"{d}: no safetensors weights")


def _quantize_modules(model: Transformer, bits: int) -> None:
    """Swap every linear layer (not the router) and the expert stacks for weight-only quantised ones."""
    def swap(parent: nn.Module, name: str) -> None:
        lin = getattr(parent, name)
        if isinstance(lin, nn.Linear):
            setattr(parent, name, QuantLinear(lin.in_features, lin.out_features, bits, bias=lin.bias is not None))

    for block in model.layers:
        for name, _ in list(block.attn.named_children()):
            swap(block.attn, name)
        ffn = block.ffn
        dense = ffn if isinstance(ffn, SwiGLU) else getattr(ffn, "shared", None)
        if dense is not None:
            for name in ("w1", "w2", "w3"):
                swap(dense, name)
        if hasattr(ffn, "experts"):
            E, D, Fh = ffn.experts.w_gate.shape
            ffn.experts = QuantExperts(E, D, Fh, bits)
    if model.output is not None:
        swap(model, "output")


class _Filler:
    """Copies checkpoint tensors into the model and remembers what is still missing."""

    def __init__(self, model: Transformer, fam: Family, logical: dict[str, tuple[int, ...]]):
        self.model, self.fam, self.cfg = model, fam, fam.config
        self.shapes = logical  # our parameter name -> shape, as if unquantised
        self.missing: dict[str, set[int] | None] = {}
        for name, shape in logical.items():
            if name.endswith("expert_bias"):
                continue  # optional: zero unless the checkpoint has one (DeepSeek-V3)
            self.missing[name] = set(range(shape[0])) if ".experts.w_" in name else None

    def put(self, src: str, target: Target, t: torch.Tensor) -> None:
        name = target.name
        if name not in self.shapes:
            raise HFError(f"{src}: no place for it in this config ({name}; unsupported option?)")
        shape = self.shapes[name]
        if target.fused:
            E = shape[0]
            if target.split is not None:
                half = t.shape[-2] // 2
                t = t[..., :half, :] if target.split == 0 else t[..., half:, :]
            t = t.transpose(-1, -2)
            if tuple(t.shape) != tuple(shape):
                self._mismatch(src, list(t.shape), list(shape))
            for e in range(E):
                self._store(name, e, t[e])
            return
        want = shape[1:] if target.expert is not None else shape
        if target.transpose:
            t = t.t()
        if tuple(t.shape) != tuple(want):
            self._mismatch(src, list(t.transpose(0, 1).shape if target.transpose else t.shape),
                           list(want[::-1] if target.transpose else want))
        if target.expert is not None and not 0 <= target.expert < shape[0]:
            raise HFError(f"{src}: expert {target.expert} but the config has {shape[0]} experts")
        if self.fam.rope_perm:
            t = permute_rope_rows(name, t, self.cfg)
        self._store(name, target.expert, t)

    @staticmethod
    def _mismatch(src: str, got: list, want: list) -> None:
        raise HFError(f"shape mismatch: {src} is {got} but config.json implies {want}")

    def _store(self, name: str, expert: int | None, t: torch.Tensor) -> None:
        mod_path, attr = name.rsplit(".", 1)
        mod = self.model.get_submodule(mod_path)
        with torch.no_grad():
            if isinstance(mod, QuantLinear) and attr == "weight":
                mod.set_weight(t.float())
            elif isinstance(mod, QuantExperts):
                mod.set_expert(attr, expert, t.float())
            else:
                dest = getattr(mod, attr)
                dest = dest if expert is None else dest[expert]
                dest.copy_(t.to(device=dest.device, dtype=dest.dtype))
        left = self.missing.get(name)
        if left is not None and expert is not None:
            left.discard(expert)
            if not left:
                del self.missing[name]
        elif name in self.missing:
            del self.missing[name]

    def check_complete(self) -> None:
        if self.missing:
            name, left = next(iter(self.missing.items()))
            what = f"{name} (expert {min(left)})" if left else name
            raise HFError(f"checkpoint is missing {len(self.missing)} tensor(s) for this config, e.g. {what}")


def _read_shard(path: Path) -> Iterable[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:  # memory-mapped
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).strip().splitlines()
        raise HFError(f"{path.name}: not a valid safetensors file ({msg[0] if msg else type(e).__name__})") from None


def empty_model(fam: Family, device="cpu", dtype: str = "fp32") -> tuple[Transformer, dict[str, tuple[int, ...]]]:
    """Our Transformer for ``fam`` allocated (uninitialised) on ``device`` in ``dtype``, and
    the unquantised shapes of its parameters."""
    if dtype not in DTYPES:
        raise HFError(f"unknown dtype {dtype!r} (choose from bf16, fp32, fp16, int8, int4)")
    kind = DTYPES[dtype]
    bits = kind if isinstance(kind, int) else 0
    if bits and torch.device(device).type != "cpu":
        raise HFError(f"--dtype {dtype} is a CPU format; use bf16 on {device}")
    compute = torch.float32 if bits else kind
    cfg = fam.config
    with torch.device("meta"):
        model = Transformer(cfg)
        logical = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        model.to(compute)
        for moe in model.moe_layers():
            moe.gate.float()  # the router always runs in float32
            moe.expert_bias.data = moe.expert_bias.float()
        if bits:
            try:
                _quantize_modules(model, bits)
            except ValueError as e:
                raise HFError(f"--dtype {dtype}: {e}") from None
    model.to_empty(device=device)
    model.reset_buffers(torch.device(device))
    for moe in model.moe_layers():
        moe.expert_bias.zero_()
        moe.counts_acc.zero_()
    return model, logical


def fill(model: Transformer, fam: Family, logical: dict, tensors: Iterable[tuple[str, torch.Tensor]],
         where: str = "checkpoint") -> None:
    """Copy (name, tensor) pairs in checkpoint naming into ``model``; HFError on anything unexpected or missing."""
    filler = _Filler(model, fam, logical)
    for name, t in tensors:
        targets = map_name(name, fam.config)
        if targets is None:
            raise HFError(f"{where}: unexpected tensor {name} (unsupported option for {fam.architecture}?)")
        for target in targets:
            filler.put(name, target, t)
    filler.check_complete()


def load_hf_model(model_dir, device="cpu", dtype: str = "fp32", max_context: int | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[Transformer, Family]:
    """Our Transformer (eval mode) holding the checkpoint's weights, and its family."""
    d = Path(model_dir)
    hf = read_hf_config(d)
    fam = family_from_config(hf, max_context)
    if dtype not in DTYPES:
        raise HFError(f"unknown dtype {dtype!r} (choose from bf16, fp32, fp16, int8, int4)")
    files = weight_files(d)
    model, logical = empty_model(fam, device, dtype)

    def tensors():
        for i, path in enumerate(files):
            if progress is not None:
                progress(f"loading {path.name} ({i + 1}/{len(files)})")
            yield from _read_shard(path)

    fill(model, fam, logical, tensors(), where=d.name)
    return model.eval(), fam
