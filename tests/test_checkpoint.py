"""Released weights: export -> load round trip, int8 storage, and clear errors for bad files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from model.checkpoint import CheckpointError, dequantize_int8, export, load_model, quantize_int8
from model.config import get_preset
from model.transformer import Transformer


def _tiny_model(seed=1, **kw):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(get_preset("tiny"), **kw)
    return Transformer(cfg).eval(), cfg


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))


def test_export_load_identical_logits(tmp_path, tiny_tokenizer_path):
    model, cfg = _tiny_model()
    with torch.no_grad():
        model.moe_layers()[0].expert_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.05]))
    export(model, cfg, tiny_tokenizer_path, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config == cfg
    assert not loaded.model.training
    ids = list(range(3, 40))
    assert torch.equal(_logits(loaded.model, ids), _logits(model, ids))
    assert loaded.tokenizer.vocab_size <= cfg.vocab_size
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["quantization"] is None and len(meta["sha256"]) == 64


def test_int8_export_is_smaller_and_close(tmp_path, tiny_tokenizer_path):
    model, cfg = _tiny_model()
    export(model, cfg, tiny_tokenizer_path, tmp_path / "f32")
    export(model, cfg, tiny_tokenizer_path, tmp_path / "i8", int8=True)
    f32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    i8 = (tmp_path / "i8" / "model.safetensors").stat().st_size
    assert i8 < 0.35 * f32
    loaded = load_model(tmp_path / "i8").model
    ids = list(range(3, 60))
    a, b = _logits(model, ids), _logits(loaded, ids)
    assert not torch.equal(a, b)
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.02
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_quantize_per_channel_error_bound():
    w = torch.randn(5, 7, 3) * torch.tensor([1.0, 10.0, 0.1])  # channels with very different ranges
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (5, 1, 3)
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s.float() * 0.5 + 1e-6).all())


def test_export_refuses_to_overwrite(tmp_path, tiny_tokenizer_path):
    model, cfg = _tiny_model()
    export(model, cfg, tiny_tokenizer_path, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    other, _ = _tiny_model(seed=2)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        export(other, cfg, tiny_tokenizer_path, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_truncated_weights_file(model_copy):
    w = model_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        load_model(model_copy)
    assert "truncated" in _one_line(e)


def test_truncated_file_without_size_record_is_still_refused(model_copy):
    meta = json.loads((model_copy / "config.json").read_text())
    del meta["size"], meta["sha256"]
    (model_copy / "config.json").write_text(json.dumps(meta))
    w = model_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        load_model(model_copy)
    assert "not a valid safetensors file" in _one_line(e)


def test_corrupt_bytes_fail_the_checksum(model_copy):
    w = model_copy / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_model(model_copy)
    assert "sha256" in _one_line(e)


def test_wrong_shape_weights_for_the_config(tmp_path, tiny_tokenizer_path, model_copy):
    """A weights file from another config (dim 32) next to the tiny config.json."""
    other, other_cfg = _tiny_model(dim=32, n_heads=2, n_kv_heads=1)
    export(other, other_cfg, tiny_tokenizer_path, tmp_path / "other")
    meta = json.loads((model_copy / "config.json").read_text())
    other_meta = json.loads((tmp_path / "other" / "config.json").read_text())
    meta["sha256"], meta["size"] = other_meta["sha256"], other_meta["size"]
    shutil.copyfile(tmp_path / "other" / "model.safetensors", model_copy / "model.safetensors")
    (model_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        load_model(model_copy)
    assert "another config" in _one_line(e)


def test_missing_and_unknown_config(tmp_path, model_copy):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    meta = json.loads((model_copy / "config.json").read_text())
    meta["config"]["n_layers"] = 3  # one more layer than the weights hold
    (model_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(model_copy)
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_model(model_copy)
    (model_copy / "model.safetensors").unlink()
    (model_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights file missing"):
        load_model(model_copy)


def test_no_pickle_in_the_loader():
    import inspect

    import model.checkpoint as ck

    src = inspect.getsource(ck)
    assert "torch.load(" not in src and "import pickle" not in src


# ---------------------------------------------------------------- export from a train.py checkpoint
def _train_checkpoint(out, tokenizer_path, **cfg_kw):
    from model.checkpoint import save_checkpoint

    model, cfg = _tiny_model(seed=3, **cfg_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.randint(0, 512, (2, 16))).mean().backward()  # real optimizer state
    opt.step()
    model.eval()
    extra = {"step": 1, "model_config": cfg.to_dict(), "tokenizer": str(tokenizer_path)}
    save_checkpoint(out, 1, model, opt, extra, keep=2)
    return model


def test_cli_export_from_training_checkpoint(tmp_path, tiny_tokenizer_path, capsys):
    from model.checkpoint import main

    model = _train_checkpoint(tmp_path / "run", tiny_tokenizer_path)
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 0
    assert "exported step 1" in capsys.readouterr().out
    ids = list(range(5, 30))
    assert torch.equal(_logits(load_model(tmp_path / "m").model, ids), _logits(model, ids))
    assert main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "q"), "--int8"]) == 0
    assert load_model(tmp_path / "q").config == model.cfg


def test_cli_export_errors(tmp_path, tiny_tokenizer_path, capsys):
    from model.checkpoint import main

    _train_checkpoint(tmp_path / "run", tiny_tokenizer_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "a")], "not found"),
        (["--checkpoint", str(tmp_path), "--out", str(tmp_path / "a")], "no complete training checkpoint"),
        (["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "busy")], "refusing to overwrite"),
        (["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "a"), "--tokenizer", "/no/tok"],
         "tokenizer not found"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists()


def test_export_of_a_checkpoint_from_another_config(tmp_path, tiny_tokenizer_path, capsys):
    """The checkpoint's recorded config disagrees with its weights: a clear error, exit 2."""
    import json as _json

    import torch.distributed.checkpoint as dcp

    from model.checkpoint import main

    _train_checkpoint(tmp_path / "run", tiny_tokenizer_path, dim=32, n_heads=2, n_kv_heads=1)
    step = next((tmp_path / "run" / "ckpt").glob("step_*"))
    holder = {"extra": ""}
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.load(holder, checkpoint_id=str(step))
    extra = _json.loads(holder["extra"])
    extra["model_config"]["dim"] = 64  # a checkpoint that claims another config
    extra["model_config"]["n_heads"], extra["model_config"]["n_kv_heads"] = 4, 2
    model, cfg = _tiny_model(seed=3, dim=32, n_heads=2, n_kv_heads=1)
    from model.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "bad", 1, model, torch.optim.AdamW(model.parameters()), extra, keep=1)
    assert main(["--checkpoint", str(tmp_path / "bad"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "do not load" in err and "Size mismatch" in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


def test_small_preset_int8_export_fits_40_mib(tmp_path, tiny_tokenizer_path):
    cfg = get_preset("small")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    export(model, cfg, tiny_tokenizer_path, tmp_path / "small", int8=True)
    assert (tmp_path / "small" / "model.safetensors").stat().st_size <= 40 * 2**20
    loaded = load_model(tmp_path / "small").model
    x = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 1e-3
