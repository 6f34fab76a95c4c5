"""User settings from TOML: ``~/.config/moecoder/config.toml`` (or ``$MOECODER_CONFIG``).

The one settings loader: every face (``review``, the task commands, ``lsp``, ``chat``,
``serve``) reads its engine settings through :func:`load_settings` and
:meth:`Settings.for_face`, so the config file's model and device reach all of them.
A command-line flag or an editor setting still wins over the file.

Example::

    model = "~/models/moecoder-small"     # default: the shipped model
    device = "cpu"
    max_seconds = 30
    completion_context_tokens = 512       # prompt cap for completions (prefill time = latency)
    completion_beams = 1                  # > 1: beam search of single-line completions, the beams
                                          # reranked by the code after the line (5: +2-3 points exact
                                          # match, ~2x time; in-process faces only: `moecoder serve`
                                          # decodes greedily; with the repository's memory, 1 is
                                          # still better on lines naming other files: docs/editors.md)

    [max_tokens]                          # per task
    complete = 64
    comment = 160
    debug = 160
    explain = 200

    [features]                            # switch tasks off in every face
    complete = true                       # lsp completions, `moecoder complete`
    comment = true                        # docstring actions, review's missing docstrings
    debug = true                          # lsp diagnostics, review's debug hints
    explain = true                        # lsp hover, `moecoder explain`

    [review]
    min_confidence = 0.5                  # drop debug hints below this (review, lsp, chat)
    jobs = 4
    fail_on = "warning"                   # "error" | "warning" | "note" | "none"

    [lsp]                                 # per-face overrides of model / device / max_seconds / server
    device = "cuda"                       # (tables: lsp, chat, review, tasks, serve)

    [chat]
    server = "http://127.0.0.1:8000"      # use a running `moecoder serve` (as --server URL does)

    [watermark]                           # off unless a key is set (docs/watermark.md)
    key = "a secret"                      # every face's generations carry the mark of this key;
                                          # a face table overrides: [lsp] watermark_key = "" (off)

A missing file means defaults; a malformed one raises :class:`ConfigError` (a
``ValueError``) with a one-line message naming the file and the key. Validation is
``cattrs`` (strict: no int for a bool, no float for an int, no unknown keys).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cattrs

TASK_NAMES = ("complete", "comment", "debug", "explain")
FAIL_LEVELS = ("error", "warning", "note", "none")
FACES = ("lsp", "chat", "review", "tasks", "serve")


class ConfigError(ValueError):
    pass


@dataclass
class ReviewSettings:
    # debug hints below this are dropped: at 0.5 the shipped model flags 15-32% of clean held-out
    # functions (python -m assistant.bench --calibration 40 [--seed 1]; docs/benchmarks.md)
    min_confidence: float = 0.5
    jobs: int = 4
    fail_on: str = "warning"


@dataclass
class FaceSettings:
    """What one face may set differently from the top level (None: inherit)."""

    model: str | None = None
    device: str | None = None
    max_seconds: float | None = None
    server: str | None = None  # a running `moecoder serve` to use instead of loading the model
    watermark_key: str | None = None  # "" switches the watermark off for this face


@dataclass
class Settings:
    model: str | None = None
    device: str = "cpu"
    server: str | None = None  # e.g. "http://127.0.0.1:8000": faces use it instead of an in-process engine
    max_seconds: float | None = 60.0
    completion_context_tokens: int = 512
    completion_beams: int = 1  # single-line completions: beam search of this width (1 = greedy)
    max_tokens: dict[str, int] = field(default_factory=lambda: {"complete": 64, "comment": 160, "debug": 160,
                                                                 "explain": 160})
    features: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(TASK_NAMES, True))
    review: ReviewSettings = field(default_factory=ReviewSettings)
    lsp: FaceSettings = field(default_factory=FaceSettings)
    chat: FaceSettings = field(default_factory=FaceSettings)
    tasks: FaceSettings = field(default_factory=FaceSettings)
    serve: FaceSettings = field(default_factory=FaceSettings)
    # the [review] table also takes model/device/max_seconds overrides (kept apart from ReviewSettings)
    review_face: FaceSettings = field(default_factory=FaceSettings)
    watermark_key: str | None = None  # [watermark] key: generations carry its mark (model/watermark.py)
    source: Path | None = None  # the file these came from

    def for_face(self, face: str) -> Settings:
        """These settings with the ``[face]`` table's overrides applied."""
        if face not in FACES:
            raise ValueError(f"unknown face {face!r} (known: {', '.join(FACES)})")
        over = self.review_face if face == "review" else getattr(self, face)
        changes = {k: v for k, v in dataclasses.asdict(over).items() if v is not None}
        return dataclasses.replace(self, **changes)

    def disabled_tasks(self) -> frozenset[str]:
        return frozenset(t for t, on in self.features.items() if not on)

    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`assistant.engine.Engine` (besides model and device)."""
        return {"default_max_seconds": self.max_seconds, "max_new_tokens_for": dict(self.max_tokens),
                "completion_context_tokens": self.completion_context_tokens,
                "completion_beams": self.completion_beams,
                "disabled_tasks": self.disabled_tasks(), "watermark": self.watermark()}

    def watermark(self) -> Any:
        """The :class:`model.watermark.Watermark` of ``watermark_key``, or None (off)."""
        if not self.watermark_key:
            return None
        from model.watermark import Watermark

        return Watermark(self.watermark_key)


def default_path() -> Path:
    env = os.environ.get("MOECODER_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "moecoder" / "config.toml"


# -- validation ---------------------------------------------------------------------------
@dataclass
class _ReviewTable:  # the [review] table as written: review settings plus face overrides
    min_confidence: float = 0.5
    jobs: int = 4
    fail_on: str = "warning"
    model: str | None = None
    device: str | None = None
    max_seconds: float | None = None
    watermark_key: str | None = None


@dataclass
class _WatermarkTable:
    key: str | None = None


@dataclass
class _File:  # the file as written (every key optional)
    model: str | None = None
    device: str = "cpu"
    server: str | None = None
    max_seconds: float = 60.0
    completion_context_tokens: int = 512
    completion_beams: int = 1
    max_tokens: dict[str, int] = field(default_factory=dict)
    features: dict[str, bool] = field(default_factory=dict)
    review: _ReviewTable = field(default_factory=_ReviewTable)
    lsp: FaceSettings = field(default_factory=FaceSettings)
    chat: FaceSettings = field(default_factory=FaceSettings)
    tasks: FaceSettings = field(default_factory=FaceSettings)
    serve: FaceSettings = field(default_factory=FaceSettings)
    watermark: _WatermarkTable = field(default_factory=_WatermarkTable)


def _strict(kind: type, want: str):
    def hook(value: Any, _type: Any) -> Any:
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise ValueError(f"must be {want}, got {value!r}")
        return value

    return hook


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(int, _strict(int, "an integer"))
_converter.register_structure_hook(float, _strict(float, "a number"))
_converter.register_structure_hook(str, _strict(str, "a string"))
_converter.register_structure_hook(bool, _strict(bool, "true or false"))


def _first_error(e: BaseException) -> str:
    """``key: problem`` of the first failure in a cattrs error tree."""
    path: list[str] = []
    while True:
        for note in getattr(e, "__notes__", []):
            name = getattr(note, "name", None)  # an attribute of a class
            name = name if name is not None else getattr(note, "index", None)  # a key of a table
            if name is not None:
                path.append(str(name))
        if not (isinstance(e, BaseExceptionGroup) and e.exceptions):
            break
        e = e.exceptions[0]
    key = ".".join(path) or "the file"
    if isinstance(e, cattrs.ForbiddenExtraKeysError):
        return f"unknown setting {', '.join(sorted(e.extra_fields))!r} in {key}"
    if isinstance(e, TypeError | AttributeError):
        return f"{key} must be a table"
    return f"{key} {e}" if path else str(e)


def _check(cond: bool, path: Path, key: str, want: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {key} must be {want}")


def parse_settings(data: dict[str, Any], path: Path = Path("<config>")) -> Settings:
    try:
        raw = _converter.structure(data, _File)
    except (cattrs.BaseValidationError, ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {_first_error(e)}") from None
    _check(raw.model is None or bool(raw.model), path, "model", "a directory path")
    for name, f in (("server", raw), *((t, getattr(raw, t)) for t in ("lsp", "chat", "tasks", "serve"))):
        key = "server" if name == "server" else f"{name}.server"
        _check(f.server is None or f.server.startswith(("http://", "https://")), path, key,
               "an http:// or https:// URL")
    _check(raw.max_seconds > 0, path, "max_seconds", "a positive number")
    _check(raw.completion_context_tokens >= 16, path, "completion_context_tokens", "an integer >= 16")
    _check(1 <= raw.completion_beams <= 16, path, "completion_beams", "an integer from 1 to 16")
    for table in ("max_tokens", "features"):
        for k, v in getattr(raw, table).items():
            _check(k in TASK_NAMES, path, f"{table}.{k}", f"one of {', '.join(TASK_NAMES)}")
            _check(table == "features" or v > 0, path, f"{table}.{k}", "a positive integer")
    r = raw.review
    _check(0 <= r.min_confidence <= 1, path, "review.min_confidence", "a number in [0, 1]")
    _check(r.jobs > 0, path, "review.jobs", "a positive integer")
    _check(r.fail_on in FAIL_LEVELS, path, "review.fail_on", f"one of {', '.join(FAIL_LEVELS)}")
    faces = {f: getattr(raw, f) for f in ("lsp", "chat", "tasks", "serve")}
    faces["review_face"] = FaceSettings(r.model, r.device, r.max_seconds, watermark_key=r.watermark_key)
    _check(raw.watermark.key is None or bool(raw.watermark.key), path, "watermark.key", "a non-empty string")
    for name, f in faces.items():
        label = "review" if name == "review_face" else name
        _check(f.max_seconds is None or f.max_seconds > 0, path, f"{label}.max_seconds", "a positive number")
        if f.model is not None:
            f.model = str(Path(f.model).expanduser())
    s = Settings(model=str(Path(raw.model).expanduser()) if raw.model else None, device=raw.device, server=raw.server,
                 max_seconds=raw.max_seconds, completion_context_tokens=raw.completion_context_tokens,
                 completion_beams=raw.completion_beams,
                 review=ReviewSettings(r.min_confidence, r.jobs, r.fail_on), source=path,
                 watermark_key=raw.watermark.key, **faces)
    s.max_tokens.update(raw.max_tokens)
    s.features.update(raw.features)
    return s


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Settings from ``path`` (default: :func:`default_path`); defaults when it does not exist."""
    p = Path(path).expanduser() if path is not None else default_path()
    if not p.exists():
        if path is not None:
            raise ConfigError(f"{p}: no such config file")
        return Settings()
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read: {e}") from None
    return parse_settings(data, p)


def face_settings(face: str, server: str | None = None) -> Settings:
    """What a face runs with: the config file, its ``[face]`` table, then ``--server URL``.

    Raises ``ValueError`` (one line) for a bad config file or a server that is not an http(s) URL.
    """
    config = load_settings().for_face(face)
    if server is not None:
        if not server.startswith(("http://", "https://")):
            raise ValueError(f"--server wants an http:// URL, got {server!r}")
        config = dataclasses.replace(config, server=server)
    return config
