"""``moecoder tune``: file split, training examples from the product's prompts, the written model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from assistant.engine import Engine, ModelBackend
from assistant.tune import _batch_loss, main, split_files, training_example

FILE = '''def area_{k}(width, height):
    total = width * height
    return total


def scale_{k}(values, factor):
    out = [v * factor for v in values]
    return out
'''


def _repo(tmp_path: Path, n: int = 12) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for k in range(n):
        (root / f"mod{k}.py").write_text(FILE.format(k=k))
    (root / "empty.py").write_text("")
    return root


def test_split_holds_out_a_tenth_of_the_files(tmp_path):
    root = _repo(tmp_path, 20)
    s = split_files(root, seed=0)
    assert len(s.valid) == 2 and len(s.train) == 18  # empty.py has no code lines
    assert not {p for p, _ in s.valid} & {p for p, _ in s.train}
    assert split_files(root, seed=0).valid == s.valid and split_files(root, seed=1).valid != s.valid


def test_training_examples_are_completion_prompts_and_learning_lowers_the_loss(tmp_path, tiny_model_dir):
    from model.checkpoint import load_model

    root = _repo(tmp_path)
    loaded = load_model(tiny_model_dir)
    eng = Engine.from_loaded(backend=ModelBackend(loaded.model, loaded.tokenizer, loaded.config),
                             completion_context_tokens=128)
    tok = loaded.tokenizer
    ids, start = training_example(eng, root, ("mod0.py", FILE.format(k=0), 1), repo=False)
    assert ids[start - 1] == tok.special_id("fim_middle") and tok.decode(ids[start:-1]) == "    total = width * height\n"
    assert not tok.decode(ids[:start]).endswith(" ")  # the prompt stops at the line start (healed indentation)
    assert ids[-1] == tok.eos_id
    batch = [ex for ex in (training_example(eng, root, ("mod0.py", FILE.format(k=0), i), repo=False)
                           for i in (1, 2, 6, 7)) if ex]
    model = loaded.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = _batch_loss(model, batch, tok.eos_id)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(_batch_loss(model, batch, tok.eos_id)) < first - 0.5


def test_tune_writes_a_loadable_model_with_its_report(tmp_path, tiny_model_dir, capsys):
    from model.checkpoint import load_model

    root = _repo(tmp_path)
    out = tmp_path / "tuned"
    rc = main([str(root), "--model", str(tiny_model_dir), "--out", str(out), "--minutes", "0.6",
               "--eval-lines", "4", "--threads", "1", "--train-context", "96"])
    assert rc == 0
    meta = json.loads((out / "tune.json").read_text())
    assert meta["steps"] >= 1 and meta["valid_files"] and meta["train_files"] == 11
    assert 0.0 <= meta["after"]["exact_match"] <= 1.0
    assert meta["schedule"] == "cosine" and 0.0 < meta["lr_end"] < meta["lr"]  # the rate at the last step
    assert load_model(out).config.vocab_size == 512
    assert "before" in capsys.readouterr().out
    # an existing model is not replaced without --force; a missing repository is a one-line error
    assert main([str(root), "--model", str(tiny_model_dir), "--out", str(out), "--minutes", "0.1"]) == 2
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err


def test_time_decay_falls_from_the_peak_to_a_tenth():
    from assistant.tune import time_decay

    vals = [time_decay(f / 10) for f in range(11)]
    assert vals[0] == 1.0 and abs(vals[-1] - 0.1) < 1e-12 and abs(vals[5] - 0.55) < 1e-12
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert time_decay(-1.0) == 1.0 and time_decay(2.0) == vals[-1]  # clamped outside the budget
