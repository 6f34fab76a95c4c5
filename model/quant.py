"""Mixed int4/int8 storage of released weights (``export(..., quant="int4")``).

The routed experts — most of a MoE's parameters — are stored as group-wise int4 (symmetric,
one fp16 scale per group of 32 input values, two values per byte; the codec of
:mod:`model.hf.quant`); every other matrix (embedding = tied head, attention, dense and
shared-expert FFNs) as int8 per output channel, as in plain int8 export; the router gate,
norms and selection bias stay float32. Weights are dequantised to float32 at load, so the
CPU speed of a loaded model is the same as for int8 storage; only the file shrinks.

Expert stacks are ``[E, in, out]``; they are quantised in the ``[E, out, in]`` layout (the
reduction over the input dim) and stored that way (``meta["layouts"]`` says so).
"""

from __future__ import annotations

import torch

from model.hf.quant import GROUP, dequantize, quantize

METHOD = "int4-group32-experts+int8"
Q4_SUFFIX = ".q4scale"
_EXPERT_MATS = ("w_gate", "w_up", "w_down")


def is_int4_target(name: str, t: torch.Tensor) -> bool:
    """Routed-expert stacks whose input dim splits into groups."""
    return t.ndim == 3 and name.rsplit(".", 1)[-1] in _EXPERT_MATS and t.shape[1] % GROUP == 0


def quantize_state(sd: dict[str, torch.Tensor], quantizable, quantize_int8, int8_suffix: str
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors to save, the config's ``quantization`` entry)."""
    tensors: dict[str, torch.Tensor] = {}
    int4: list[str] = []
    int8: list[str] = []
    for name, t in sd.items():
        t = t.detach().cpu()
        if is_int4_target(name, t):
            q, s = quantize(t.float().transpose(1, 2).contiguous(), 4)
            tensors[name], tensors[name + Q4_SUFFIX] = q, s.half().contiguous()
            int4.append(name)
        elif quantizable(name, t):
            tensors[name], tensors[name + int8_suffix] = quantize_int8(t)
            int8.append(name)
        elif t.is_floating_point():
            tensors[name] = t.float().contiguous()
        else:
            tensors[name] = t.contiguous()
    meta = {"method": METHOD, "scale_dtype": "float16", "group": GROUP, "int4_tensors": int4,
            "tensors": int8, "axis": 1, "layouts": {n: "E,out,in" for n in int4}}
    return tensors, meta


def dequantize_state(tensors: dict[str, torch.Tensor], meta: dict, dequantize_int8, int8_suffix: str,
                     error) -> dict[str, torch.Tensor]:
    """The float32 state dict of a mixed int4/int8 file; ``error(msg)`` builds the exception."""
    q4 = set(meta.get("int4_tensors", []))
    q8 = set(meta.get("tensors", []))
    if int(meta.get("group", GROUP)) != GROUP:
        raise error(f"int4 group size {meta.get('group')} is not supported (only {GROUP})")
    sd: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith((Q4_SUFFIX, int8_suffix)):
            continue
        if name in q4:
            s = tensors.get(name + Q4_SUFFIX)
            if s is None or t.dtype != torch.uint8:
                raise error(f"int4 tensor {name} lacks its packed data or scale")
            sd[name] = dequantize(t, s, 4).transpose(1, 2).contiguous()
        elif name in q8:
            s = tensors.get(name + int8_suffix)
            if s is None or t.dtype != torch.int8:
                raise error(f"quantised tensor {name} lacks its int8 data or scale")
            sd[name] = dequantize_int8(t, s)
        else:
            sd[name] = t
    return sd
