"""Asynchronous checkpoints (#9): ``dcp.async_save`` in model/train.py (``--async-ckpt on`` on CPU).

The state is staged (copied) before training goes on; the COMPLETE marker is written only after
the background write has finished on every rank, so ``--resume`` never takes a save in flight.
CPU, tiny preset, a handful of steps; subprocess runs use one torch thread.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

from model.checkpoint import CheckpointError, TrainCheckpoints, latest_checkpoint, read_checkpoint_extra
from model.train import main
from tests.test_parallel import TRAIN, _launch
from tests.test_parallel import _pack as _pack_kernels
from tests.test_train import TRAIN_ARGS, _env, _losses, _wait_for_step

ASYNC = ["--async-ckpt", "on"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_tokenizer):
    return _pack_kernels(tiny_tokenizer, tmp_path_factory.mktemp("async") / "data")


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    return model, opt


def _load(ckpt, model, opt):
    from model.checkpoint import load_checkpoint

    load_checkpoint(ckpt, model, opt)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_save_in_flight_is_never_complete_and_its_state_is_staged(tmp_path, monkeypatch):
    """The write of step 2 is held in the background thread: the training tensors change meanwhile,
    the step-2 directory has no marker and ``latest_checkpoint`` stays at step 1; once the write
    is let go, ``finish`` marks it and it holds the state of the moment of ``save``."""
    from torch.distributed.checkpoint import FileSystemWriter

    model, opt = _tiny()
    saver = TrainCheckpoints(tmp_path, keep=2, asynchronous=True)
    assert saver.save(1, model, opt, {"step": 1}).name == "step_0000001"
    assert latest_checkpoint(tmp_path) is None  # written, maybe, but not marked yet
    assert saver.finish().name == "step_0000001"
    assert latest_checkpoint(tmp_path).name == "step_0000001"

    release, entered = threading.Event(), threading.Event()
    orig = FileSystemWriter.write_data

    def held(self, plan, planner):
        entered.set()
        assert release.wait(60)
        return orig(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", held)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    d2 = saver.save(2, model, opt, {"step": 2})
    with torch.no_grad():  # training goes on at once: the staged copy must not see this
        for p in model.parameters():
            p.add_(1.0)
    assert entered.wait(60)
    assert saver.writing and saver.pending == d2
    assert not (d2 / "COMPLETE").exists()
    assert latest_checkpoint(tmp_path).name == "step_0000001"  # a resume now takes step 1
    release.set()
    assert saver.finish() == d2 and not saver.writing and saver.pending is None
    assert latest_checkpoint(tmp_path) == d2
    assert read_checkpoint_extra(d2) == {"step": 2}
    got = _load(d2, *_tiny())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # keep 2: a third save prunes step 1
    monkeypatch.setattr(FileSystemWriter, "write_data", orig)
    saver.save(3, model, opt, {"step": 3})
    saver.finish()
    assert sorted(d.name for d in (tmp_path / "ckpt").iterdir()) == ["step_0000002", "step_0000003"]


def test_a_failed_background_write_gets_no_marker(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    model, opt = _tiny()
    saver = TrainCheckpoints(tmp_path, keep=2, asynchronous=True)
    saver.save(1, model, opt, {"step": 1})
    saver.finish()

    def broken(self, plan, planner):
        raise OSError("No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", broken)
    d = saver.save(2, model, opt, {"step": 2})
    with pytest.raises(CheckpointError, match="step_0000002 could not be written"):
        saver.finish()
    assert not (d / "COMPLETE").exists()
    assert latest_checkpoint(tmp_path).name == "step_0000001"


def test_bad_async_flag_is_a_one_line_error(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--data", str(data_dir), "--out", str(out), *TRAIN_ARGS, "--async-ckpt", "maybe"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--async-ckpt" in err and "\n" not in err
    assert not out.exists()


def test_async_resume_after_sigkill_reproduces_losses(data_dir, tmp_path):
    """Async checkpoints every 4 steps; SIGKILL after step 10; ``--resume`` (async too) gives the
    same per-step losses as an uninterrupted synchronous run, and keeps the newest two."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = [sys.executable, "-m", "model.train", "--data", str(data_dir), "--max-steps", "14",
            "--ckpt-every", "4", *TRAIN_ARGS]
    r = subprocess.run([*args, "--out", str(full)], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    want = _losses(full)
    assert sorted(want) == list(range(1, 15))

    p = subprocess.Popen([*args, *ASYNC, "--out", str(killed)], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(killed, 10, p)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    ck = latest_checkpoint(killed)
    assert ck is not None and ck.name in ("step_0000004", "step_0000008"), ck
    log = (killed / "train.log").read_text()
    assert "staged" in log and "complete (written in" in log, log
    r = subprocess.run([*args, *ASYNC, "--out", str(killed), "--resume"], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ck}" in (killed / "train.log").read_text()
    assert _losses(killed) == want  # bit-identical per-step losses
    recs = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "loss" in x] == list(range(1, 15))  # no duplicated steps
    assert sorted(d.name for d in (killed / "ckpt").iterdir()) == ["step_0000012", "step_0000014"]
    assert all((killed / "ckpt" / n / "COMPLETE").is_file() for n in ("step_0000012", "step_0000014"))


def test_async_sigterm_waits_for_the_write_and_marks_it(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "model.train", "--data", str(data_dir), "--max-steps", "200", *TRAIN_ARGS,
            *ASYNC, "--eval-every", "1000", "--ckpt-every", "2", "--out", str(out)]
    p = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(out, 3, p)
        p.send_signal(signal.SIGTERM)
        text, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, text
    ck = latest_checkpoint(out)
    assert ck is not None and max(_losses(out)) == int(ck.name.split("_")[1])  # the last step, marked
    assert not [d for d in (out / "ckpt").iterdir() if not (d / "COMPLETE").is_file()]


def test_two_rank_gloo_run_with_async_checkpoints_resumes(data_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m model.train --dp-shard 2 --async-ckpt on` (gloo): the
    background writes exchange their plans on a gloo group of their own; every kept checkpoint is
    complete; the step-15 one resumes on 2 ranks to the same losses and final weights."""
    from safetensors.torch import load_file

    args = [*TRAIN, "--data", str(data_dir), "--dp-shard", "2", *ASYNC]
    full, again = tmp_path / "full", tmp_path / "again"
    r = subprocess.run(_launch(2, *args, "--out", str(full)), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want = _losses(full)
    assert sorted(want) == list(range(1, 19))
    kept = sorted(d.name for d in (full / "ckpt").iterdir())
    assert kept == ["step_0000015", "step_0000018"]
    assert all((full / "ckpt" / n / "COMPLETE").is_file() for n in kept)
    assert "complete (written in" in (full / "train.log").read_text()

    shutil.copytree(full, again)
    shutil.rmtree(again / "ckpt" / "step_0000018")
    shutil.rmtree(again / "final")
    r = subprocess.run(_launch(2, *args, "--out", str(again), "--resume"), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in (again / "train.log").read_text()
    assert _losses(again) == want
    a, b = load_file(str(full / "final" / "model.safetensors")), load_file(str(again / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
