# Longer than 600 lines because configuration, validation (prepare) and the Trainer belong to
# one command; the loop itself (Trainer.run) is ~70 lines, checkpoints live in model/checkpoint.py
# and the process layout in model/parallel.py.
"""The training loop: ``moecoder train --preset P --data DIR --out DIR`` (one process or torchrun).

* AdamW (fused on CUDA), linear warmup + cosine decay to ``min_lr_ratio * lr`` over a fixed
  horizon ``--max-steps`` (the learning rate is a function of the step only, so a resumed run
  follows the same schedule); gradient clipping; gradient accumulation; bf16 autocast on CUDA,
  float32 on CPU; loss = cross entropy + the model's MoE auxiliary loss, and the
  DeepSeek-V3 selection-bias update after every optimizer step.
* Data: ``model.data.loader.BatchLoader`` (deterministic from the seed, FIM on code
  documents, optional task data mixed by tokens), prefetched in a background thread.
* Logs loss, lr, grad norm, tokens/s, MFU (against the device's bf16 peak; none on CPU) and
  expert load imbalance every ``--log-every`` steps: a ``\\r`` progress line on a terminal,
  plain lines in ``OUT/train.log`` and records in ``OUT/metrics.jsonl``. Bits per byte on the
  valid split every ``--eval-every`` steps; the best model so far is exported to ``OUT/best``.
* Training state (model, optimizer, step, data position, RNG states, configs) is saved with
  ``torch.distributed.checkpoint`` to ``OUT/ckpt/step_NNNNNNN/`` every ``--ckpt-minutes``
  (and ``--ckpt-every`` steps), at the end, and on SIGTERM/SIGINT (after finishing the step).
  A ``COMPLETE`` marker is written last; ``--resume`` takes the newest directory that has it,
  so a save killed half-way is never used. The newest ``--keep`` complete checkpoints stay.
  ``--async-ckpt`` (auto = on for CUDA): ``dcp.async_save`` stages the state and writes it in the
  background; the marker follows once the write has finished on every rank (``model.checkpoint.TrainCheckpoints``).
* Layout: one process, or the ranks and meshes of a torchrun job (``model.parallel.Layout``), is
  passed to :func:`train` explicitly (no module-global state); ``Trainer.run`` is the loop.
* ``--max-minutes M`` stops early (with a checkpoint) before the wall-clock budget runs out;
  chain calls with ``--resume``. On CPU a resumed run reproduces the uninterrupted run's losses.
  With ``--resume``, the settings that define the run (``TrainConfig.IDENTITY``) come from the
  checkpoint unless given on the command line; a given one that differs is an error.

Errors (unknown preset, data without tokens, a checkpoint of another configuration, ...) are
one line on stderr with exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import queue
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from model.parallel import Layout


# Dense bf16 tensor-core peak FLOP/s by device name (substring match, first hit wins).
PEAK_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
]


class TrainError(Exception):
    """A user-facing fatal error: one line, exit code 2."""


@dataclass
class TrainConfig:
    preset: str = "tiny"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 32  # rows per micro-batch (small on an H100: ~26 GiB, ~515k tokens/s)
    grad_accum: int = 2
    seq_len: int = 0  # 0 = the model's context length
    clip: float = 1.0
    max_steps: int = 3000  # the LR schedule's horizon
    schedule: str = "cosine"  # cosine, or wsd (warmup-stable-decay: linear decay over the last decay_frac)
    decay_frac: float = 0.2  # wsd: share of max_steps spent decaying to min_lr_ratio * lr
    seed: int = 0
    fim_rate: float = 0.5
    spm_rate: float = 0.5
    line_rate: float = 0.5
    task_ratio: float = 0.2  # share of tokens from --task-data (ignored without it)
    overrides: dict = field(default_factory=dict)
    # not part of the run's identity (may change between resumed calls):
    log_every: int = 10
    eval_every: int = 250
    eval_tokens: int = 262144
    ckpt_minutes: float = 10.0
    ckpt_every: int = 0  # also checkpoint every N steps (0 = only by time / at the end)
    keep: int = 2
    async_ckpt: str = "auto"  # auto (= on for CUDA), on, off: dcp.async_save, see model.checkpoint.TrainCheckpoints
    init: str = ""  # start from this model directory's weights (a fresh optimizer; ignored when resuming)

    # Fields that define the run: a resume with any of these changed is refused.
    IDENTITY = (
        "preset", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "batch_size",
        "grad_accum", "seq_len", "clip", "max_steps", "seed", "fim_rate", "spm_rate", "line_rate",
        "task_ratio", "overrides", "schedule", "decay_frac",
    )

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in self.IDENTITY}

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def cosine_decay(t: float, floor_ratio: float) -> float:
    """The share of the peak rate at fraction ``t`` of the decay (clamped to [0, 1]): cosine from 1 to
    ``floor_ratio`` (``lr_at``'s cosine schedule; ``moecoder tune`` over its time budget)."""
    t = min(1.0, max(0.0, t))
    return floor_ratio + (1.0 - floor_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to the floor
    (``schedule="cosine"``) or constant until the last ``decay_frac`` of ``max_steps`` and linear to
    the floor there (``schedule="wsd"``, warmup-stable-decay: suits training in pieces)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        floor = cfg.lr * cfg.min_lr_ratio
        decay = max(1, round(cfg.max_steps * cfg.decay_frac))
        start = max(cfg.warmup_steps, cfg.max_steps - decay)
        if step < start:
            return cfg.lr
        t = min(1.0, (step - start + 1) / max(1, cfg.max_steps - start))
        return cfg.lr + (floor - cfg.lr) * t
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * cosine_decay((step - cfg.warmup_steps) / span, cfg.min_lr_ratio)


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 * active params + attention (PaLM appendix B convention)."""
    from model.config import param_counts

    _, active = param_counts(model_cfg)
    return 6.0 * active + 12.0 * model_cfg.n_layers * model_cfg.dim * seq_len


# ---------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (main turns it into the message)
        raise TrainError(message)


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default once: not where the help already says it, not for None / False / []."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(
        prog="moecoder train",
        description="Train a model on packed tokens on one device (CPU or CUDA).",
        formatter_class=_DefaultsOnce,
    )
    p.add_argument("--preset", default=d.preset, help="model preset (tiny, small, base)")
    p.add_argument("--data", required=True, help="packed token directory (moecoder data pack)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, logs, best model")
    p.add_argument("--task-data", default=None, help="packed task directory (moecoder data tasks)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the one named in DATA/meta.json)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last complete checkpoint")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) within this budget")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--kernels", choices=["auto", "triton", "reference"], default="auto",
                   help="MoE kernels (sets MOECODER_KERNELS)")
    p.add_argument("--compile", action="store_true", help="torch.compile attention, norms and dense FFNs (not the routed experts)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="set a model config field, e.g. n_experts=1 (repeatable)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("preset", "overrides"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    from model.cli_args import add_parallel_arguments  # scale-out (#9), torch-free for a fast --help

    add_parallel_arguments(p)
    return p


def _explicit_options(argv: list[str] | None) -> set[str]:
    """Destinations of the options given on the command line (not left at their defaults)."""
    p = _parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(p.parse_args(sys.argv[1:] if argv is None else argv)))


def _parse_overrides(items: list[str]) -> dict:
    from model.config import ModelConfig

    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    defaults = ModelConfig().to_dict()
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TrainError(f"--override wants KEY=VALUE, got {item!r}")
        if key not in types:
            raise TrainError(f"--override: unknown model config field {key!r} (choose from {', '.join(types)})")
        kind = type(defaults[key])
        try:
            if kind is bool:
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                val = raw.lower() in ("1", "true", "yes")
            else:
                val = kind(raw)
        except ValueError:
            raise TrainError(f"--override {key}: {raw!r} is not a valid {kind.__name__}") from None
        out[key] = val
    return out


class Logger:
    def __init__(self, out: Path, resume_step: int | None):
        self.out = out
        self.tty = sys.stderr.isatty()
        self.log = open(out / "train.log", "a", buffering=1)
        metrics = out / "metrics.jsonl"
        if resume_step is not None and metrics.exists():
            # Records after the checkpoint belong to a lost timeline; the resumed run rewrites them.
            kept = []
            for line in metrics.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            tmp = metrics.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, metrics)
        self.metrics = open(metrics, "a", buffering=1)
        self._progress_shown = False

    def line(self, msg: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.log.write(f"{stamp} {msg}\n")
        if self.tty and self._progress_shown:
            sys.stderr.write("\r\033[K")
            self._progress_shown = False
        print(msg, file=sys.stderr if self.tty else sys.stdout, flush=True)

    def record(self, rec: dict) -> None:
        self.metrics.write(json.dumps(rec) + "\n")

    def progress(self, msg: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + msg)
            sys.stderr.flush()
            self._progress_shown = True

    def step(self, msg: str, step: int, max_steps: int) -> None:
        """A log interval's line: a progress bar on a terminal (the plain line in the log file)."""
        if not self.tty:
            self.line(msg)
            return
        n = 20 * step // max_steps
        self.progress(f"[{'#' * n}{'.' * (20 - n)}] " + msg)
        self.log.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def close(self) -> None:
        if self.tty and self._progress_shown:
            sys.stderr.write("\n")
        self.log.close()
        self.metrics.close()


def _fmt_secs(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------- data
class Prefetcher:
    """Runs the (deterministic) loader in a thread; yields (tensor batch, loader state after it)."""

    def __init__(self, loader, rows: int, pin: bool, depth: int = 3):
        import torch

        self.loader, self.rows, self.pin = loader, rows, pin
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self._torch = torch
        self.thread = threading.Thread(target=self._run, daemon=True, name="moecoder-data")
        self.thread.start()

    def _run(self) -> None:
        torch = self._torch
        try:
            while not self.stop.is_set():
                arr = self.loader.next_batch(self.rows)
                t = torch.from_numpy(arr)
                if self.pin:
                    t = t.pin_memory()
                item = (t, self.loader.state_dict())
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the main thread by next()
            self.q.put(e)

    def next(self):
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _rng_state(torch, device) -> dict:
    py = random.getstate()
    npst = np.random.get_state()
    st = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": None,
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return st


def _set_rng_state(torch, device, st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(torch.tensor(st["cuda"], dtype=torch.uint8), device)


def _export(model, model_cfg, tokenizer_path: Path, dest: Path, layout: Layout) -> bool:
    """Export released weights to ``dest`` atomically (build beside it, then swap)."""
    from model.checkpoint import export

    model = layout.full_model_copy(model, model_cfg)  # sharded: a collective; None on ranks > 0
    if model is None:
        return False
    tmp = dest.with_name(dest.name + ".tmp")
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    export(model, model_cfg, tokenizer_path, tmp)
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return True


# ---------------------------------------------------------------------------------- setup
@dataclass
class Setup:
    cfg: TrainConfig
    model_cfg: object
    out: Path
    data_dir: Path
    tokenizer_path: Path
    tokenizer: object
    code: object
    valid: object | None
    tasks: object | None
    resume: bool
    resume_from: Path | None
    resume_extra: dict | None
    device: object
    notes: list[str]


def _resolve_tokenizer(arg: str | None, meta: dict, data_dir: Path) -> Path:
    if arg:
        cand = [Path(arg)]
    else:
        name = meta.get("tokenizer")
        if not name:
            raise TrainError(f"{data_dir}/meta.json names no tokenizer; pass --tokenizer")
        cand = [Path(name), data_dir / name, data_dir / Path(name).name]
    for c in cand:
        if c.is_file() or (c.is_dir() and (c / "tokenizer.model").is_file()):
            return c
    raise TrainError(f"tokenizer {cand[0]} not found; pass --tokenizer")


def prepare(args: argparse.Namespace) -> Setup:
    """Validate everything before anything is written; raises TrainError."""
    import torch

    from model.checkpoint import latest_checkpoint, read_checkpoint_extra
    from model.config import get_preset
    from model.data.loader import DataError, open_split, read_meta
    from model.tokenizer import Tokenizer

    cfg = TrainConfig(preset=args.preset, overrides=_parse_overrides(args.override))
    for f in dataclasses.fields(TrainConfig):
        if f.name not in ("preset", "overrides"):
            setattr(cfg, f.name, getattr(args, f.name))
    notes: list[str] = []
    if args.resume and args.out and Path(args.out).is_dir():
        # Settings that define the run and were not given on this command line come from the
        # checkpoint, so `--resume` needs no repeated flags and survives changed defaults.
        ck = latest_checkpoint(args.out)
        if ck is not None:
            saved = read_checkpoint_extra(ck).get("train_config", {})
            explicit = getattr(args, "explicit", set())
            adopted = []
            for k in TrainConfig.IDENTITY:
                flag = "override" if k == "overrides" else k
                if flag not in explicit and k in saved and saved[k] != getattr(cfg, k):
                    setattr(cfg, k, saved[k])
                    adopted.append(f"{k}={saved[k]!r}")
            if adopted:
                notes.append(f"from the checkpoint: {', '.join(adopted)}")
    try:
        model_cfg = get_preset(cfg.preset)
    except ValueError as e:
        raise TrainError(str(e)) from None

    data_dir = Path(args.data)
    try:
        meta = read_meta(data_dir)
        code = open_split(data_dir, "train")
    except DataError as e:
        raise TrainError(str(e)) from None
    if meta.get("kind") == "tasks":
        raise TrainError(f"{data_dir} holds task data; pass it as --task-data and code tokens as --data")
    try:
        valid = open_split(data_dir, "valid")
    except DataError:
        valid = None
        notes.append(f"no valid split in {data_dir}: no bits-per-byte evaluation")
    tasks = None
    if args.task_data:
        try:
            tasks = open_split(args.task_data, "train")
        except DataError as e:
            raise TrainError(str(e)) from None
        if int(tasks.meta.get("vocab_size", -1)) != int(meta.get("vocab_size", -2)):
            raise TrainError(
                f"--task-data vocab size {tasks.meta.get('vocab_size')} differs from --data's {meta.get('vocab_size')}"
            )
    if tasks is None:
        cfg.task_ratio = 0.0
    if cfg.async_ckpt not in ("auto", "on", "off"):
        raise TrainError(f"--async-ckpt must be auto, on or off, not {cfg.async_ckpt!r}")
    tok_path = _resolve_tokenizer(args.tokenizer, meta, data_dir)
    try:
        tok = Tokenizer.load(tok_path)
    except ValueError as e:
        raise TrainError(str(e)) from None
    vocab = int(meta.get("vocab_size", tok.vocab_size))
    if tok.vocab_size != vocab:
        raise TrainError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but {data_dir} was packed with {vocab}")

    # model config: preset + data vocabulary + overrides
    d = model_cfg.to_dict()
    if "vocab_size" not in cfg.overrides and d["vocab_size"] != vocab:
        notes.append(f"vocab_size {d['vocab_size']} -> {vocab} (the data's tokenizer)")
        d["vocab_size"] = vocab
    d.update(cfg.overrides)
    try:
        model_cfg = type(model_cfg).from_dict(d)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if model_cfg.vocab_size < vocab:
        raise TrainError(f"vocab_size {model_cfg.vocab_size} is smaller than the data's {vocab}")
    if cfg.seq_len <= 0:
        cfg.seq_len = model_cfg.max_seq_len
    if cfg.seq_len > model_cfg.max_seq_len:
        raise TrainError(f"--seq-len {cfg.seq_len} exceeds the model's context length {model_cfg.max_seq_len}")
    for name, ok in [
        ("batch-size", cfg.batch_size > 0), ("grad-accum", cfg.grad_accum > 0), ("max-steps", cfg.max_steps > 0),
        ("lr", cfg.lr > 0), ("log-every", cfg.log_every > 0), ("keep", cfg.keep > 0),
        ("fim-rate", 0 <= cfg.fim_rate <= 1), ("spm-rate", 0 <= cfg.spm_rate <= 1),
        ("line-rate", 0 <= cfg.line_rate <= 1), ("task-ratio", 0 <= cfg.task_ratio < 1),
        ("min-lr-ratio", 0 <= cfg.min_lr_ratio <= 1), ("warmup-steps", cfg.warmup_steps >= 0),
        ("schedule", cfg.schedule in ("cosine", "wsd")), ("decay-frac", 0 < cfg.decay_frac <= 1),
    ]:
        if not ok:
            raise TrainError(f"--{name} has an invalid value")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise TrainError("--max-minutes must be positive")
    if cfg.init:
        from model.checkpoint import CheckpointError, read_config

        try:
            init_cfg, _ = read_config(cfg.init)
        except CheckpointError as e:
            raise TrainError(f"--init: {e}") from None
        diffs = [f"{k} {v!r} (init) vs {model_cfg.to_dict().get(k)!r}"
                 for k, v in init_cfg.to_dict().items() if model_cfg.to_dict().get(k) != v]
        if diffs:
            raise TrainError(f"--init {cfg.init}: another model configuration ({'; '.join(diffs[:3])}); "
                             "use the same --preset/--override")

    # device
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(dev)
    except RuntimeError:
        raise TrainError(f"unknown --device {args.device!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"unsupported --device {args.device!r} (use cpu or cuda)")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise TrainError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")

    # output directory / resume
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory")
    resume_from, extra = None, None
    if args.resume:
        resume_from = latest_checkpoint(out)
        if resume_from is not None:
            extra = read_checkpoint_extra(resume_from)
            diffs = []
            saved = extra.get("train_config", {})
            base = TrainConfig()
            for k, v in cfg.identity().items():
                if saved.get(k, getattr(base, k)) != v:  # a field added later: its default
                    diffs.append(f"{k} {saved.get(k)!r} -> {v!r}")
            saved_m = extra.get("model_config", {})
            for k, v in model_cfg.to_dict().items():
                if saved_m.get(k) != v:
                    diffs.append(f"model.{k} {saved_m.get(k)!r} -> {v!r}")
            if diffs:
                raise TrainError(
                    f"checkpoint {resume_from} is from another configuration ({'; '.join(diffs[:4])}"
                    f"{'; ...' if len(diffs) > 4 else ''}); use the same flags or another --out"
                )
            want_docs = {"code": code.num_docs}
            if tasks is not None:
                want_docs["tasks"] = tasks.num_docs
            if extra.get("loader", {}).get("docs") != want_docs:
                raise TrainError(
                    f"checkpoint {resume_from} was trained on other data (documents {extra.get('loader', {}).get('docs')}"
                    f", now {want_docs})"
                )
    else:
        existing = [n for n in ("ckpt", "train.log", "metrics.jsonl", "best", "final") if (out / n).exists()]
        if existing:
            raise TrainError(f"{out} already holds a training run ({', '.join(existing)}); pass --resume or use a new --out")
    return Setup(cfg, model_cfg, out, data_dir, tok_path, tok, code, valid, tasks, bool(args.resume), resume_from, extra,
                 device, notes)


# ---------------------------------------------------------------------------------- training
class _Stop:
    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now, without the checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def evaluate_bpb(model, rows, n_bytes: int, batch_size: int, device, autocast) -> tuple[float, float]:
    """(bits per byte, mean loss in nats) over the eval rows."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_tok = 0
    with torch.no_grad():
        for i in range(0, rows.shape[0], batch_size):
            chunk = rows[i : i + batch_size].to(device, non_blocking=True)
            x, y = chunk[:, :-1], chunk[:, 1:]
            with autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum")
            total += loss.double()
            n_tok += y.numel()
    model.train(was_training)
    nats = float(total)
    return nats / math.log(2) / max(1, n_bytes), nats / max(1, n_tok)


def _compile_dense_parts(model) -> None:
    """``torch.compile`` the parts with static shapes, in place (state-dict keys unchanged).

    The routed experts have data-dependent shapes (tokens per expert), which make a whole-model
    compile recompile endlessly; they keep running through ``kernels`` eagerly.
    """
    from model.moe import MoE

    model.norm.compile()
    for block in model.layers:
        block.attn_norm.compile()
        block.ffn_norm.compile()
        block.attn.compile()
        if isinstance(block.ffn, MoE):
            if block.ffn.shared is not None:
                block.ffn.shared.compile()
        else:
            block.ffn.compile()


def _autocast(cuda: bool):
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def _build_model(s: Setup, layout: Layout):
    """The model (initialised from ``--init`` weights if given), sharded over ``layout``,
    and its AdamW optimizer; (model, optimizer, note)."""
    import torch

    from model.transformer import Transformer

    cfg, device, cuda = s.cfg, s.device, s.device.type == "cuda"
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    with torch.device(device) if cuda else contextlib.nullcontext():  # on the GPU: faster for big presets
        model = Transformer(s.model_cfg)
    note = ""
    if cfg.init and s.resume_from is None:  # released weights (int8 dequantised); a fresh optimizer
        from model.checkpoint import load_model

        init = load_model(cfg.init).model.state_dict()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(init[k].to(v.device, v.dtype))
        note = f"initialised from {cfg.init}"
    model.train()
    if layout.distributed:  # expert parallelism + FSDP2/HSDP under torchrun, before the optimizer
        if cfg.batch_size % layout.world_size:
            raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the {layout.world_size} "
                             "data-parallel ranks")
        layout.barrier()  # every rank has validated OUT before rank 0 writes into it
        try:
            layout.parallelize(model, device.type, param_dtype=torch.bfloat16 if cuda else None)
        except ValueError as e:  # e.g. n_experts not divisible by --ep
            raise TrainError(str(e)) from None
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                  **({"fused": True} if cuda else {}))
    return model, optimizer, note


class Trainer:
    """One training run: the model, its optimizer, the data, the logs and checkpoints.
    :meth:`run` is the loop; the pieces it calls are the methods around it."""

    def __init__(self, s: Setup, layout: Layout, compile_model: bool, t_start: float):
        import torch

        from model.checkpoint import TrainCheckpoints
        from model.data.fim import FIMConfig, FIMTokens, newline_mask
        from model.data.loader import BatchLoader, LoaderConfig, eval_rows

        self.s, self.cfg, self.layout, self.t_start = s, s.cfg, layout, t_start
        self.device, self.cuda = s.device, s.device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        cfg = self.cfg
        self.model, self.optimizer, self.init_note = _build_model(s, layout)
        self.loader = BatchLoader(
            s.code, LoaderConfig(seq_len=cfg.seq_len, seed=cfg.seed, task_ratio=cfg.task_ratio,
                                 fim=FIMConfig(cfg.fim_rate, cfg.spm_rate, cfg.line_rate)),
            FIMTokens.from_tokenizer(s.tokenizer), newline_mask(s.tokenizer), tasks=s.tasks)
        self.step, self.tokens_seen, self.best_bpb, self.train_seconds = 0, 0, None, 0.0
        if s.resume_from is not None:
            self._resume()
        s.out.mkdir(parents=True, exist_ok=True)
        # --resume: drop metrics past the checkpoint (or all of them when there is none yet)
        from model.parallel import NullLogger

        self.log = Logger(s.out, self.step if s.resume else None) if layout.is_main else NullLogger()
        if compile_model:
            _compile_dense_parts(self.model)
        # async checkpoints: on by default on CUDA; --async-ckpt on for CPU (gloo) runs
        asynchronous = cfg.async_ckpt == "on" or (cfg.async_ckpt == "auto" and self.cuda)
        self.ckpts = TrainCheckpoints(s.out, cfg.keep, layout, asynchronous=asynchronous)
        self.ev_rows, self.ev_bytes = None, 0  # evaluation rows and their byte count (fixed for the run)
        if s.valid is not None and cfg.eval_every > 0:
            arr = eval_rows(s.valid, cfg.seq_len, cfg.eval_tokens)
            self.ev_bytes = len(s.tokenizer.decode_bytes(arr[:, 1:].reshape(-1).tolist()))
            self.ev_rows = torch.from_numpy(arr).pin_memory() if self.cuda else torch.from_numpy(arr)
        self._log_header()

    def _resume(self) -> None:
        import torch

        from model.checkpoint import CheckpointError, load_checkpoint
        from model.data.loader import DataError

        try:
            load_checkpoint(self.s.resume_from, self.model, self.optimizer)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        ex = self.s.resume_extra
        self.step, self.tokens_seen = int(ex["step"]), int(ex["tokens"])
        self.best_bpb, self.train_seconds = ex.get("best_bpb"), float(ex.get("train_seconds", 0.0))
        try:
            self.loader.load_state_dict(ex["loader"])
        except DataError as e:
            raise TrainError(str(e)) from None
        _set_rng_state(torch, self.device, ex["rng"])

    def _log_header(self) -> None:
        import torch

        from model.config import param_counts

        s, cfg, log, layout = self.s, self.cfg, self.log, self.layout
        self.total_params = sum(p.numel() for p in self.model.parameters())
        _, active = param_counts(s.model_cfg)
        self.fpt = flops_per_token(s.model_cfg, cfg.seq_len)
        dev_name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        peak = peak_flops(dev_name) if self.cuda else None
        self.peak = peak * layout.world_size if peak else None  # MFU of the whole job
        if layout.distributed:
            d = layout.dims
            log.line(f"distributed: {layout.world_size} ranks ({layout.backend}), dp_replicate {d.dp_replicate} x "
                     f"dp_shard {d.dp_shard}, ep {d.ep}, attempt {layout.restart}")
        if s.resume_from is not None:
            log.line(f"resumed from {s.resume_from} at step {self.step} ({self.tokens_seen:,} tokens)")
        for n in s.notes + ([self.init_note] if self.init_note else []):
            log.line(f"note: {n}")
        log.line(f"preset {cfg.preset} {json.dumps(s.model_cfg.to_dict())} | params {self.total_params / 1e6:.2f}M "
                 f"(active {active / 1e6:.2f}M) | device {dev_name} | kernels {os.environ.get('MOECODER_KERNELS', 'auto')}")
        log.line(f"train {json.dumps(dataclasses.asdict(cfg))} | {cfg.tokens_per_step:,} tokens/step | "
                 f"data {s.code.num_docs:,} docs {len(s.code.tokens):,} tokens"
                 + (f" + tasks {s.tasks.num_docs:,} docs" if s.tasks is not None else ""))

    # -- the pieces of a step ------------------------------------------------------------
    def train_step(self, batch, lr: float):
        """One optimizer step over ``grad_accum`` micro-batches; (loss, aux loss, grad norm, imbalance)."""
        import torch
        import torch.nn.functional as F

        from model.parallel import all_reduce_expert_counts, clip_grad_norm_

        cfg, model = self.cfg, self.model
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        micro = batch.to(self.device, non_blocking=True).view(cfg.grad_accum, cfg.batch_size, cfg.seq_len + 1)
        micro = micro[:, self.layout.local_rows(cfg.batch_size)]  # this rank's rows
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for m in range(cfg.grad_accum):
            x, y = micro[m, :, :-1], micro[m, :, 1:]
            with _autocast(self.cuda):
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
                aux = model.aux_loss()
            ((loss + aux) / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            aux_sum += aux.detach()
        gnorm = clip_grad_norm_(self.params, cfg.clip)  # torch's own on one process
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        all_reduce_expert_counts(model)  # the bias sees every rank's tokens
        counts = model.expert_counts()
        imbalance = (counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)).max() if counts.numel() else None
        model.update_bias()
        return loss_sum / cfg.grad_accum, aux_sum / cfg.grad_accum, gnorm, imbalance

    def log_interval(self, loss_acc, aux_acc, n_steps: int, dt: float, lr: float, gnorm, imbalance) -> float:
        """Log the last ``n_steps`` steps (``dt`` seconds of training); the seconds a step took."""
        import torch

        cfg, step = self.cfg, self.step
        loss_acc, aux_acc = self.layout.dp_mean(loss_acc), self.layout.dp_mean(aux_acc)  # over every rank's rows
        loss_v = float(loss_acc) / n_steps
        if not math.isfinite(loss_v):
            raise TrainError(f"loss is {loss_v} at step {step}; lower --lr or check the data")
        tps = n_steps * cfg.tokens_per_step / dt
        self.train_seconds += dt
        mfu = self.fpt * tps / self.peak if self.peak else None
        rec = {"step": step, "loss": loss_v, "aux_loss": float(aux_acc) / n_steps, "lr": lr,
               "grad_norm": float(gnorm), "tokens": self.tokens_seen, "tokens_per_s": round(tps, 1),
               "mfu": None if mfu is None else round(mfu, 5),
               "expert_imbalance": None if imbalance is None else round(float(imbalance), 4),
               "epoch": round(_epoch(self.loader_state, self.s.code.num_docs), 4),
               "elapsed_s": round(time.time() - self.t_start, 1)}
        if self.cuda:
            rec["max_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        self.log.record(rec)
        msg = (f"step {step}/{cfg.max_steps} loss {loss_v:.4f} lr {lr:.2e} gnorm {rec['grad_norm']:.3f} "
               f"{tps / 1e3:.1f}k tok/s" + (f" mfu {100 * mfu:.1f}%" if mfu is not None else "")
               + (f" imb {rec['expert_imbalance']:.2f}" if imbalance is not None else "")
               + (f" mem {rec['max_mem_gib']:.1f}G" if self.cuda else "")
               + f" eta {_fmt_secs((cfg.max_steps - step) * dt / n_steps)}")
        self.log.step(msg, step, cfg.max_steps)
        return dt / n_steps

    def evaluate(self) -> None:
        """Bits per byte on the valid rows; a new best is exported to ``OUT/best``."""
        t = time.time()
        bpb, vloss = evaluate_bpb(self.model, self.ev_rows, self.ev_bytes, self.cfg.batch_size, self.device,
                                  lambda: _autocast(self.cuda))
        improved = self.layout.agree(self.best_bpb is None or bpb < self.best_bpb)[0]  # export is collective
        self.log.record({"step": self.step, "valid_bpb": bpb, "valid_loss": vloss, "eval_s": round(time.time() - t, 3)})
        exported = ""
        if improved:
            self.best_bpb = bpb
            if _export(self.model, self.s.model_cfg, self.s.tokenizer_path, self.s.out / "best", self.layout):
                (self.s.out / "best_info.json").write_text(json.dumps({"step": self.step, "valid_bpb": bpb}) + "\n")
                exported = " -> best/"
        self.log.line(f"step {self.step} valid bpb {bpb:.4f} loss {vloss:.4f}{exported}")

    def checkpoint(self, reason: str) -> float:
        """Save (async: stage) a checkpoint of this step; the seconds training paused."""
        import torch

        s, cfg, t = self.s, self.cfg, time.time()
        extra = {"step": self.step, "tokens": self.tokens_seen, "best_bpb": self.best_bpb,
                 "train_seconds": self.train_seconds, "loader": self.loader_state,
                 "rng": _rng_state(torch, self.device), "train_config": cfg.identity(),
                 "train_config_full": dataclasses.asdict(cfg), "model_config": s.model_cfg.to_dict(),
                 "data": str(s.data_dir), "tokenizer": str(s.tokenizer_path)}
        self.finish_checkpoint()  # the previous save's marker first (its wait is part of this pause)
        d = self.ckpts.save(self.step, self.model, self.optimizer, extra)
        dt = time.time() - t
        staged = "staged " if self.ckpts.asynchronous else ""
        self.log.line(f"step {self.step} checkpoint {d} {staged}({reason}, {dt:.1f}s)"
                      + ("; writing in the background" if staged else ""))
        return dt

    def finish_checkpoint(self) -> None:
        t = time.time()
        d = self.ckpts.finish()
        if d is not None:
            self.log.line(f"checkpoint {d} complete (written in {self.ckpts.write_s:.1f}s, "
                          f"waited {time.time() - t:.1f}s)")

    def should_stop(self, stopper: _Stop, deadline: float | None, step_est: float | None,
                    save_est: float, eval_est: float) -> str | None:
        """Why to stop before the next step (a signal, the time budget), agreed by every rank."""
        out_of_time = False
        if deadline is not None and step_est is not None:
            need = step_est + save_est + 1.0
            if self.ev_rows is not None and (self.step + 1) % self.cfg.eval_every == 0:
                need += eval_est
            out_of_time = time.time() + need > deadline
        signalled, out_of_time, writing = self.layout.agree(stopper.signum is not None, out_of_time,
                                                            self.ckpts.writing)
        if self.ckpts.pending is not None and not writing:
            self.finish_checkpoint()  # written on every rank: mark it now, not at the next save
        if signalled:
            return "signal " + (signal.Signals(stopper.signum).name if stopper.signum else "(another rank)")
        return "time budget" if out_of_time else None

    def finish(self, reason: str) -> None:
        """The last eval, checkpoint and export of the run."""
        cfg, step = self.cfg, self.step
        if step >= cfg.max_steps and self.ev_rows is not None and step % cfg.eval_every != 0:
            self.evaluate()
        self.checkpoint(reason)
        self.finish_checkpoint()  # async: the last save is on disk and marked before we exit
        if step >= cfg.max_steps:
            if _export(self.model, self.s.model_cfg, self.s.tokenizer_path, self.s.out / "final", self.layout):
                self.log.line(f"exported the final model to {self.s.out / 'final'}")
            self.log.line(f"done: {step} steps, {self.tokens_seen:,} tokens, best valid bpb {self.best_bpb}")
        else:
            self.log.line(f"stopped at step {step}/{cfg.max_steps} ({reason}); continue with --resume")

    # -- the loop ------------------------------------------------------------------------
    def run(self, max_minutes: float | None) -> int:
        """Train to ``--max-steps`` (or a signal, or the time budget); the exit code."""
        import torch

        cfg = self.cfg
        if self.init_note and self.step == 0 and self.ev_rows is not None:
            self.evaluate()  # the starting point's bits per byte (kept as best/ until training beats it)
        stopper = _Stop()
        stopper.install()
        prefetch = Prefetcher(self.loader, cfg.batch_size * cfg.grad_accum, pin=self.cuda)
        self.loader_state = self.loader.state_dict()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        save_est = 2.0 + self.total_params * 4 * 3 / 200e6  # model + 2 AdamW moments at ~200 MB/s
        step_est, eval_est = None, 0.0
        last_ckpt_t = time.time()
        deadline = self.t_start + max_minutes * 60 if max_minutes else None
        interval_t, interval_steps = time.time(), 0
        loss_acc = torch.zeros((), device=self.device)
        aux_acc = torch.zeros((), device=self.device)
        reason, exit_code = "end", 0
        try:
            while self.step < cfg.max_steps:
                stop = self.should_stop(stopper, deadline, step_est, save_est, eval_est)
                if stop is not None:
                    reason, exit_code = stop, 130 if stop.startswith("signal") else 0
                    break
                t_step, lr = time.time(), lr_at(self.step, cfg)
                batch, loader_state_next = prefetch.next()
                loss, aux, gnorm, imbalance = self.train_step(batch, lr)
                self.step += 1
                self.tokens_seen += cfg.tokens_per_step
                self.loader_state = loader_state_next
                loss_acc += loss
                aux_acc += aux
                interval_steps += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    step_est = self.log_interval(loss_acc, aux_acc, interval_steps, max(1e-9, time.time() - interval_t),
                                                 lr, gnorm, imbalance)
                    loss_acc.zero_()
                    aux_acc.zero_()
                    interval_t, interval_steps = time.time(), 0
                paused = time.time()
                if self.ev_rows is not None and self.step % cfg.eval_every == 0:
                    self.evaluate()
                    eval_est = time.time() - paused
                if (cfg.ckpt_every > 0 and self.step % cfg.ckpt_every == 0) or self.layout.agree(
                        time.time() - last_ckpt_t > cfg.ckpt_minutes * 60)[0]:
                    save_est = self.checkpoint("periodic") + 1.0 + self.ckpts.write_s  # the last save waits for it
                    last_ckpt_t = time.time()
                interval_t += time.time() - paused  # eval/checkpoint time is not training throughput
                if step_est is None:
                    step_est = time.time() - t_step  # a first guess until the first log interval
        except KeyboardInterrupt:
            self.log.line(f"interrupted at step {self.step}; no checkpoint written for it")
            self.log.close()
            return 130
        except TrainError as e:
            self.log.line(f"error: {e}")
            self.log.close()
            raise
        finally:
            prefetch.close()
            stopper.restore()
        self.finish(reason)
        self.log.close()
        return exit_code


def train(s: Setup, layout: Layout, max_minutes: float | None, compile_model: bool, t_start: float) -> int:
    """Train ``s`` on ``layout`` (one process: ``Layout()``); the exit code."""
    return Trainer(s, layout, compile_model, t_start).run(max_minutes)


def _epoch(loader_state: dict, num_docs: int) -> float:
    cur = loader_state["cursors"]["code"]
    return cur["epoch"] + cur["pos"] / max(1, num_docs)


def main(argv: list[str] | None = None) -> int:
    t_start = time.time()
    try:
        args = _parser().parse_args(argv)
        args.explicit = _explicit_options(argv)
    except TrainError as e:
        print(f"moecoder train: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.kernels != "auto":
        os.environ["MOECODER_KERNELS"] = args.kernels
    if args.threads < 0:
        print("moecoder train: error: --threads must be >= 0", file=sys.stderr)
        return 2
    import torch

    from model.checkpoint import CheckpointError
    from model.parallel import Layout, init_from_env

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    layout = Layout()
    code = None
    try:
        try:  # under torchrun: join the process group (a restarted attempt resumes)
            layout = init_from_env(args)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if layout.restart > 0:
            args.resume = True  # torchrun --max-restarts: continue from the last complete checkpoint
        setup = prepare(args)
        code = train(setup, layout, args.max_minutes, args.compile, t_start)
        return code
    except (TrainError, CheckpointError) as e:
        if layout.is_main:
            print(f"moecoder train: error: {e}", file=sys.stderr)
        return 2
    finally:
        layout.shutdown(synchronise=code == 0)
        torch.set_num_threads(threads)
        if code == 0 and layout.distributed:
            _end_worker()


def _end_worker() -> None:
    """End a torchrun worker whose run succeeded now, without the interpreter's teardown.

    Everything is written and the process group is gone by then; what remained was the C++
    side's teardown at exit (no Python thread was left), which now and then aborted a rank
    ("terminate called without an active exception", then SIGSEGV) after a complete run, and
    torchrun counted the run as failed: 1 run in 5 of the 2-rank training with the CPU loaded,
    barrier or not (faulthandler showed no Python frame left). ``os._exit`` skips that teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
