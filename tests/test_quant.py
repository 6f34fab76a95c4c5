"""Mixed int4/int8 storage: export, load, size, and the loaded model's outputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.checkpoint import CheckpointError, export, load_model
from model.config import get_preset
from model.quant import is_int4_target
from model.transformer import Transformer


@pytest.fixture(scope="module")
def model_and_cfg():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=512, dim=64, expert_hidden=64)
    return Transformer(cfg).eval(), cfg


def test_int4_export_is_smaller_and_loads_close_to_the_original(model_and_cfg, tiny_tokenizer_path, tmp_path):
    model, cfg = model_and_cfg
    d8 = export(model, cfg, tiny_tokenizer_path, tmp_path / "i8", int8=True)
    d4 = export(model, cfg, tiny_tokenizer_path, tmp_path / "i4", int4=True)
    meta = json.loads((d4 / "config.json").read_text())["quantization"]
    experts = [n for n, t in model.state_dict().items() if is_int4_target(n, t)]
    assert experts and sorted(meta["int4_tensors"]) == sorted(experts)
    expert_bytes = sum(t.numel() for n, t in model.state_dict().items() if n in experts)
    saved = (d8 / "model.safetensors").stat().st_size - (d4 / "model.safetensors").stat().st_size
    assert saved > 0.4 * expert_bytes  # an expert weight: 1 byte -> half a byte + a scale per 32
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = model(x).float()
        l4 = load_model(d4).model(x).float()
        l8 = load_model(d8).model(x).float()
    assert (l4 - ref).abs().max() < 0.1 * ref.abs().max()
    assert (l4 - ref).norm() > (l8 - ref).norm()  # int4 is coarser than int8, but close
    sd4 = load_model(d4).model.state_dict()
    for n in experts:  # the [E, in, out] layout comes back as it was
        assert sd4[n].shape == model.state_dict()[n].shape
        assert (sd4[n] - model.state_dict()[n]).norm() < 0.2 * model.state_dict()[n].norm()


def test_int4_file_without_its_scales_is_a_one_line_error(model_and_cfg, tiny_tokenizer_path, tmp_path):
    from safetensors.torch import load_file, save_file

    from model.checkpoint import _sha256

    model, cfg = model_and_cfg
    d = export(model, cfg, tiny_tokenizer_path, tmp_path / "i4", int4=True)
    tensors = load_file(str(d / "model.safetensors"))
    name = json.loads((d / "config.json").read_text())["quantization"]["int4_tensors"][0]
    del tensors[name + ".q4scale"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "moecoder-weights"})
    meta = json.loads((d / "config.json").read_text())
    meta["sha256"], meta["size"] = _sha256(d / "model.safetensors"), (d / "model.safetensors").stat().st_size
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="int4 tensor .* lacks"):
        load_model(d)
