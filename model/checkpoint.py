"""Released weights: export to / load from a directory, never through pickle.

A model directory holds::

    model.safetensors   the weights (float32/float16/bfloat16, or int8 + fp16 per-channel scales)
    config.json         {"format", "format_version", "config", "dtype", "quantization",
                         "weights_file", "sha256", "size", "tokenizer"}
    tokenizer.model     the sentencepiece model

int8 storage quantises every weight matrix per output channel (reduction over dim 1: the
input dim of a Linear [out, in], the width of the embedding [V, D] (= the tied head's output
rows) and the input dim of the stacked experts [E, in, out]); the router gate, norms and the
selection bias stay float32. Weights are dequantised to float32 at load.

Training state (model, optimizer, step, data position, RNG) is a DCP checkpoint under
``OUT/ckpt/step_NNNNNNN``, written by :class:`TrainCheckpoints` (sync or async, a
``COMPLETE`` marker once every rank's shards are on disk, retention, discovery of the
newest complete one); ``moecoder export`` turns one into a model directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.cli_args import export_parser as _export_parser  # torch-free, for a fast `--help`
from model.config import ModelConfig
from model.transformer import Transformer

FORMAT = "moecoder-weights"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
SCALE_SUFFIX = ".qscale"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched model directory (one-line message)."""


# ---------------------------------------------------------------------- training checkpoints
CKPT_RE = re.compile(r"^step_(\d{7,})$")
MARKER = "COMPLETE"
_DCP_SINGLE = ".*torch.distributed is disabled.*"  # DCP's warning on one process


def _complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of checkpoints that have the COMPLETE marker, oldest first."""
    found = []
    if ckpt_root.is_dir():
        for d in ckpt_root.iterdir():
            m = CKPT_RE.match(d.name)
            if m and d.is_dir() and (d / MARKER).is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint under ``OUT/ckpt`` (None if none)."""
    found = _complete_checkpoints(Path(out) / "ckpt")
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def read_checkpoint_extra(ckpt: Path) -> dict:
    """The JSON ``extra`` of a training checkpoint (step, data position, configs...)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    sd = {"extra": ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DCP_SINGLE)
            dcp.load(sd, checkpoint_id=str(ckpt))
        return json.loads(sd["extra"])
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {ckpt} is unreadable: {_one_line(e)}") from None


def load_checkpoint(ckpt: Path, model, optimizer) -> None:
    """Model and optimizer state from a training checkpoint (sharded or not: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    sd = {"model": msd, "optim": osd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DCP_SINGLE)
            dcp.load(sd, checkpoint_id=str(ckpt))
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {ckpt} could not be loaded: {_one_line(e)}") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class TrainCheckpoints:
    """The training checkpoints of a run under ``OUT/ckpt``: the one object train.py uses.

    ``save`` writes ``step_NNNNNNN`` with DCP: synchronously, or (``asynchronous``) with
    ``dcp.async_save``: it first finishes the previous save, stages the state into CPU memory
    (training may change the tensors at once) and returns while a background thread writes the
    shards. The ``COMPLETE`` marker is written only once the shards are on disk on every rank
    (``finish``: before the next save, at the end, on a signal), so a process killed while
    writing leaves a directory that :func:`latest_checkpoint` (``--resume``) never takes; then
    the newest ``keep`` complete checkpoints are kept. At most one save is in flight. Under
    torchrun rank 0 alone cleans, marks and prunes, and the background thread's collectives
    run on a gloo group of their own, never interleaved with the training loop's.
    """

    def __init__(self, out: str | Path, keep: int, layout=None, asynchronous: bool = False):
        from model.parallel import Layout

        self.out, self.root, self.keep = Path(out), Path(out) / "ckpt", keep
        self.layout = layout or Layout()
        self.asynchronous = asynchronous
        self.group = None
        if asynchronous and self.layout.distributed:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")  # collective: every rank creates it here
        if asynchronous:  # DCP warns on every save from a thread, where catch_warnings is not safe
            warnings.filterwarnings("ignore", message=_DCP_SINGLE)
        self._pending: tuple | None = None  # (future, dir, step, start time, [done time])
        self.write_s = 0.0  # how long the last finished async save took from staging to on disk

    def latest(self) -> Path | None:
        return latest_checkpoint(self.out)

    @property
    def pending(self) -> Path | None:
        """The directory of the save in flight (not marked yet), if any."""
        return None if self._pending is None else self._pending[1]

    @property
    def writing(self) -> bool:
        """True while this rank's part of the save in flight is still being written."""
        return self._pending is not None and not self._pending[0].done()

    def save(self, step: int, model, optimizer, extra: dict) -> Path:
        """Save (or, async, stage) ``step``; its directory. A step saved already is not redone."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.finish()
        d = self._prepare(step)
        if d is None:
            return self.root / f"step_{step:07d}"
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd, "extra": json.dumps(extra)}
        if not self.asynchronous:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_DCP_SINGLE)
                dcp.save(state, checkpoint_id=str(d))
            self._mark_complete(d, step)
            return d
        t0, done = time.time(), [None]
        fut = dcp.async_save(state, checkpoint_id=str(d), process_group=self.group, no_dist=self.group is None)
        fut.add_done_callback(lambda _f: done.__setitem__(0, time.time()))
        self._pending = (fut, d, step, t0, done)
        return d

    def finish(self) -> Path | None:
        """Wait for the save in flight (if any) on every rank, then mark it complete; its dir."""
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        if self._pending is None:
            return None
        fut, d, step, t0, done = self._pending
        self._pending = None
        err = None
        try:
            fut.result()
        except (Exception, CheckpointException) as e:
            err = _one_line(e)
        if self.layout.agree(err is not None)[0]:  # a failed write on any rank: no marker anywhere
            raise CheckpointError(f"checkpoint {d} could not be written: {err or 'failed on another rank'}")
        self.write_s = (done[0] or time.time()) - t0
        self._mark_complete(d, step)
        return d

    def _prepare(self, step: int) -> Path | None:
        """Make ``step_N`` ready for a save (collective); None if it is complete already."""
        self.root.mkdir(parents=True, exist_ok=True)
        d = self.root / f"step_{step:07d}"
        if (d / MARKER).is_file():
            return None
        if d.exists() and self.layout.is_main:
            shutil.rmtree(d)  # a half-written save of ours
        self.layout.barrier()
        return d

    def _mark_complete(self, d: Path, step: int) -> None:
        """Once every rank's shards of ``d`` are on disk: rank 0 marks and prunes (collective)."""
        self.layout.barrier()  # all shards are on disk before the marker
        if self.layout.is_main:
            tmp = d / (MARKER + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"step": step, "time": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, d / MARKER)
            _fsync_dir(d)
            complete = _complete_checkpoints(self.root)
            for _s, old in complete[: max(0, len(complete) - max(1, self.keep))]:
                shutil.rmtree(old, ignore_errors=True)
            for other in self.root.iterdir():  # older incomplete leftovers too
                m = CKPT_RE.match(other.name)
                if m and int(m.group(1)) < step and not (other / MARKER).is_file():
                    shutil.rmtree(other, ignore_errors=True)
        self.layout.barrier()  # the other ranks see the marker from here on


def save_checkpoint(out: Path, step: int, model, optimizer, extra: dict, keep: int, layout=None) -> Path:
    """One synchronous save (:class:`TrainCheckpoints`)."""
    return TrainCheckpoints(out, keep, layout).save(step, model, optimizer, extra)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any  # model.tokenizer.Tokenizer, or model.hf.HFTokenizer for an open checkpoint
    config: ModelConfig
    family: str = "moecoder"  # or the open family: qwen3_moe, mixtral, olmoe, deepseek_v2, deepseek_v3


def default_model_dir() -> Path:
    """The shipped model: ``model/weights/``."""
    return Path(__file__).resolve().parent / "weights"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _quantizable(name: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.ndim >= 2 and not name.endswith("ffn.gate.weight")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (absmax over dim 1); returns (int8 weights, fp16 scales)."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-8).half()
    q = torch.round(w / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def export(model: Transformer, cfg: ModelConfig, tokenizer_path, out_dir, int8: bool = False,
           dtype: str = "float32", overwrite: bool = False, int4: bool = False) -> Path:
    """Write ``out_dir`` (created if needed). Refuses to replace an existing export unless ``overwrite``.
    ``int4``: routed experts group-wise int4, the rest int8 (:mod:`model.quant`)."""
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
    out = Path(out_dir)
    tok_src = Path(tokenizer_path)
    if tok_src.is_dir():
        tok_src = tok_src / TOKENIZER
    if not tok_src.is_file():
        raise CheckpointError(f"tokenizer not found: {tok_src}")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    existing = [n for n in (WEIGHTS, CONFIG, TOKENIZER) if (out / n).exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{out} already holds a model ({', '.join(existing)}); refusing to overwrite")
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    for name, t in model.state_dict().items():
        if hasattr(t, "full_tensor"):  # DTensor shards (FSDP / EP): a collective, call on every rank
            t = t.full_tensor()
        t = t.detach().cpu()
        if int8 and _quantizable(name, t):
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize_int8(t)
            quantized.append(name)
        elif t.is_floating_point():
            keep32 = int8 or name.endswith(("expert_bias", "ffn.gate.weight"))
            tensors[name] = t.float().contiguous() if keep32 else t.to(_DTYPES[dtype]).contiguous()
        else:
            tensors[name] = t.contiguous()
    q4meta = None
    if int4:  # mixed int4/int8 (model/quant.py)
        from model.quant import quantize_state

        tensors, q4meta = quantize_state({k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                                          for k, v in model.state_dict().items()},
                                         _quantizable, quantize_int8, SCALE_SUFFIX)  # fmt: skip
        int8 = True

    # write to temporary names, then rename: a crash never leaves a half-written model
    tmp_w, tmp_c, tmp_t = out / (WEIGHTS + ".tmp"), out / (CONFIG + ".tmp"), out / (TOKENIZER + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "dtype": "float32" if int8 else dtype,
        "quantization": q4meta or ({"method": "int8-per-channel", "scale_dtype": "float16", "axis": 1,
                                    "tensors": quantized} if int8 else None),
        "weights_file": WEIGHTS,
        "sha256": _sha256(tmp_w),
        "size": tmp_w.stat().st_size,
        "tokenizer": TOKENIZER,
    }
    tmp_c.write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copyfile(tok_src, tmp_t)
    os.replace(tmp_w, out / WEIGHTS)
    os.replace(tmp_t, out / TOKENIZER)
    os.replace(tmp_c, out / CONFIG)
    return out


def read_config(model_dir) -> tuple[ModelConfig, dict]:
    """Parse and validate ``config.json``; returns (config, full metadata)."""
    d = Path(model_dir)
    path = d / CONFIG
    if not d.is_dir():
        raise CheckpointError(f"model directory not found: {d}")
    if not path.is_file():
        raise CheckpointError(f"not a model directory (no {CONFIG}): {d}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format version {meta.get('format_version')!r}")
    try:
        cfg = ModelConfig.from_dict(meta.get("config"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg, meta


def _read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not path.is_file():
        raise CheckpointError(f"weights file missing: {path}")
    size = path.stat().st_size
    if "size" in meta and size != meta["size"]:
        raise CheckpointError(f"{path}: size {size} bytes, expected {meta['size']} (truncated or replaced file)")
    data = path.read_bytes()
    if "sha256" in meta and hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{path}: sha256 mismatch (corrupt or replaced file)")
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def state_dict_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Dequantise int8 (and group-wise int4) entries; leaves the others as stored."""
    from model.quant import dequantize_state

    return dequantize_state(tensors, meta.get("quantization") or {}, dequantize_int8, SCALE_SUFFIX, CheckpointError)


def check_state_dict(sd: dict[str, torch.Tensor], model: Transformer, where: str) -> None:
    """Every key present with the right shape, nothing extra: else one clear CheckpointError."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing:
        raise CheckpointError(f"{where}: missing {len(missing)} tensor(s) for this config, e.g. {missing[0]}")
    if extra:
        raise CheckpointError(f"{where}: {len(extra)} tensor(s) not in this config, e.g. {extra[0]}")
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{where}: {k} has shape {list(sd[k].shape)} but the config expects {list(t.shape)} "
                "(checkpoint from another config?)")
        if not sd[k].is_floating_point() and t.is_floating_point():
            raise CheckpointError(f"{where}: {k} has dtype {sd[k].dtype}, expected floating point")


_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def skip_init():
    """``torch.nn.init`` does nothing inside: a model built on the meta device to be filled
    from a state dict needs no random values, and torch's meta ``normal_`` imports
    ``torch._dynamo`` (seconds of a cold start, measured: docs/benchmarks.md, "Review
    throughput")."""
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS if hasattr(init, name)}

    def keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    try:
        for name in saved:
            setattr(init, name, keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], device="cpu", where: str = "") -> Transformer:
    """A Transformer on ``device`` holding ``sd`` (validated) in float32, in eval mode."""
    with torch.device("meta"), skip_init():
        model = Transformer(cfg)
    check_state_dict(sd, model, where)
    model.to_empty(device=device)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    model.reset_buffers(torch.device(device))
    for m in model.moe_layers():
        m.counts_acc.zero_()
    return model.eval()


def load_model(model_dir=None, device="cpu", dtype: str | None = None, max_context: int | None = None,
               progress=None) -> LoadedModel:
    """Load a model directory (None = the shipped model); CheckpointError on any problem.

    A Hugging Face checkpoint directory (config.json with "architectures") loads through
    ``model.hf`` into the same Transformer; ``dtype`` (fp32, bf16, fp16, int8, int4; default
    ``$MOECODER_DTYPE``, else fp32 on CPU and bf16 on CUDA) and ``max_context`` apply to those.
    """
    from model.tokenizer import Tokenizer

    d = default_model_dir() if model_dir is None else Path(model_dir)
    if model_dir is not None:
        from model import hf

        if hf.is_hf_dir(d):
            dt = dtype or os.environ.get("MOECODER_DTYPE") or ("bf16" if torch.device(device).type == "cuda" else "fp32")
            try:
                model, tok, fam = hf.load_hf(d, device, dt, max_context, progress)
            except hf.HFError as e:
                raise CheckpointError(str(e)) from None
            return LoadedModel(model, tok, fam.config, fam.name)
    if model_dir is None and not (d / CONFIG).is_file():
        raise CheckpointError(f"no shipped model in {d} yet; pass a model directory (--model DIR)")
    cfg, meta = read_config(d)
    weights = d / str(meta.get("weights_file", WEIGHTS))
    sd = state_dict_from_tensors(_read_tensors(weights, meta), meta)
    model = build_model(cfg, sd, device, where=str(weights))
    tok_path = d / str(meta.get("tokenizer", TOKENIZER))
    if not tok_path.is_file():
        raise CheckpointError(f"tokenizer missing: {tok_path}")
    try:
        tok = Tokenizer.load(tok_path)
    except ValueError as e:
        raise CheckpointError(str(e).splitlines()[0]) from None
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{tok_path}: tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}")
    return LoadedModel(model, tok, cfg)


# --------------------------------------------------------------------------- export from training
def find_training_checkpoint(path) -> Path:
    """A DCP step directory, or the newest complete ``ckpt/step_*`` under a training output dir."""
    p = Path(path)
    if (p / ".metadata").is_file():
        return p
    root = p / "ckpt" if (p / "ckpt").is_dir() else p
    steps = [d for _s, d in _complete_checkpoints(root) if (d / ".metadata").is_file()]
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not steps:
        raise CheckpointError(f"no complete training checkpoint in {p}")
    return steps[-1]


def _dcp_load(state: dict, ckpt: Path) -> None:
    """``dcp.load`` in one process; its CheckpointException (a BaseException) becomes a RuntimeError."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        try:
            dcp.load(state, checkpoint_id=str(ckpt))
        except CheckpointException as e:
            excs = [v[0] if isinstance(v, tuple) else v for v in e.failures.values()]
            lines = str(excs[0]).strip().splitlines() if excs else []
            raise RuntimeError(lines[-1] if lines else "DCP load failed") from None


def load_training_checkpoint(path) -> tuple[Transformer, ModelConfig, dict]:
    """The model of a train.py DCP checkpoint (``{"model", "optim", "extra"}``): (model, config, extra)."""
    ckpt = find_training_checkpoint(path)
    try:
        holder = {"extra": ""}
        _dcp_load(holder, ckpt)
        extra = json.loads(holder["extra"])
        cfg = ModelConfig.from_dict(extra["model_config"])
    except CheckpointError:
        raise
    except Exception as e:  # DCP raises many kinds of errors
        msg = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt}: not a readable training checkpoint ({msg[-1] if msg else type(e).__name__})") from None
    model = Transformer(cfg)
    state = {"model": model.state_dict()}
    try:
        _dcp_load(state, ckpt)
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt}: model weights do not load ({msg[-1] if msg else type(e).__name__})") from None
    check_state_dict(state["model"], model, str(ckpt))
    model.load_state_dict(state["model"])
    return model.eval(), cfg, extra


def main(argv=None) -> int:
    args = _export_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CheckpointError(f"{out} exists and is not empty; refusing to overwrite")
        model, cfg, extra = load_training_checkpoint(args.checkpoint)
        tok = Path(args.tokenizer or extra.get("tokenizer") or "")
        if not str(tok) or not (tok.is_file() or (tok / TOKENIZER).is_file()):
            raise CheckpointError(f"tokenizer not found: {tok or '(none recorded)'}; pass --tokenizer")
        export(model, cfg, tok, out, int8=args.int8, dtype=args.dtype, int4=args.int4)
    except CheckpointError as e:
        print(f"moecoder export: error: {e}", file=sys.stderr)
        return 2
    size = (out / WEIGHTS).stat().st_size
    print(f"exported step {extra.get('step', '?')} to {out} ({size / 2**20:.1f} MiB{', int4/int8' if args.int4 else ', int8' if args.int8 else ''})")
    return 0
