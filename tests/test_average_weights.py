"""scripts/average_weights.py: two model directories of one architecture -> their weighted mean."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.scripts import load_script


def _export_tiny(path, tokenizer, seed: int, **changes):
    from model.checkpoint import export
    from model.config import get_preset
    from model.transformer import Transformer

    torch.manual_seed(seed)
    cfg = dataclasses.replace(get_preset("tiny"), vocab_size=512, **changes)
    export(Transformer(cfg), cfg, tokenizer, path)


def test_average_is_the_weighted_mean_and_loads(tmp_path, tiny_tokenizer_path):
    from model.checkpoint import load_model

    avg = load_script("average_weights")
    _export_tiny(tmp_path / "a", tiny_tokenizer_path, seed=1)
    _export_tiny(tmp_path / "b", tiny_tokenizer_path, seed=2)
    assert avg.main([str(tmp_path / "a"), str(tmp_path / "b"), "--alpha", "0.25", "--out", str(tmp_path / "m")]) == 0
    a, b, m = (load_model(tmp_path / n).model.state_dict() for n in ("a", "b", "m"))
    name = next(k for k in a if k.endswith("w_gate"))
    assert not torch.allclose(a[name], b[name])
    for k in (name, "tok_emb.weight"):
        assert torch.allclose(m[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6)
    with torch.no_grad():  # the written directory is a working model
        assert torch.isfinite(load_model(tmp_path / "m").model(torch.tensor([[3, 4, 5]]))).all()


def test_average_refuses_other_architectures_and_bad_alpha(tmp_path, tiny_tokenizer_path, capsys):
    avg = load_script("average_weights")
    _export_tiny(tmp_path / "a", tiny_tokenizer_path, seed=1)
    _export_tiny(tmp_path / "wide", tiny_tokenizer_path, seed=1, n_experts=8)
    assert avg.main([str(tmp_path / "a"), str(tmp_path / "wide"), "--out", str(tmp_path / "m")]) == 2
    assert "differ" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    assert avg.main([str(tmp_path / "a"), str(tmp_path / "a"), "--alpha", "1.5", "--out", str(tmp_path / "m2")]) == 2
    assert "--alpha" in capsys.readouterr().err


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_average_at_the_ends_is_one_of_the_models(tmp_path, tiny_tokenizer_path, alpha):
    from model.checkpoint import load_model

    avg = load_script("average_weights")
    _export_tiny(tmp_path / "a", tiny_tokenizer_path, seed=1)
    _export_tiny(tmp_path / "b", tiny_tokenizer_path, seed=2)
    assert avg.main([str(tmp_path / "a"), str(tmp_path / "b"), "--alpha", str(alpha), "--out", str(tmp_path / "m")]) == 0
    want = load_model(tmp_path / ("a" if alpha == 0.0 else "b")).model.state_dict()
    got = load_model(tmp_path / "m").model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
