"""User settings from TOML: ``~/.config/moecoder/config.toml`` (or ``$MOECODER_CONFIG``).

Example::

    model = "~/models/moecoder-small"     # default: the shipped model
    device = "cpu"
    max_seconds = 30
    completion_context_tokens = 512       # prompt cap for completions (prefill time = latency)

    [max_tokens]                          # per task
    complete = 64
    comment = 160
    debug = 160
    explain = 200

    [features]                            # turn faces' features off
    complete = true
    comment = true
    debug = true
    explain = true

    [review]
    min_confidence = 0.5                  # drop debug hints below this
    jobs = 4
    fail_on = "warning"                   # "error" | "warning" | "note" | "none"

A missing file means defaults; a malformed one raises :class:`ConfigError` (a
``ValueError``) with a one-line message naming the file and the key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_NAMES = ("complete", "comment", "debug", "explain")
FAIL_LEVELS = ("error", "warning", "note", "none")


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
class Settings:
    model: str | None = None
    device: str = "cpu"
    max_seconds: float | None = 60.0
    completion_context_tokens: int = 512
    max_tokens: dict[str, int] = field(default_factory=lambda: {"complete": 64, "comment": 160, "debug": 160,
                                                                 "explain": 160})
    features: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(TASK_NAMES, True))
    review: ReviewSettings = field(default_factory=ReviewSettings)
    source: Path | None = None  # the file these came from


def default_path() -> Path:
    env = os.environ.get("MOECODER_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "moecoder" / "config.toml"


def _check(cond: bool, path: Path, key: str, want: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {key} must be {want}")


def parse_settings(data: dict[str, Any], path: Path = Path("<config>")) -> Settings:
    s = Settings(source=path)
    known = {"model", "device", "max_seconds", "completion_context_tokens", "max_tokens", "features", "review"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if "model" in data:
        _check(isinstance(data["model"], str) and bool(data["model"]), path, "model", "a directory path")
        s.model = str(Path(data["model"]).expanduser())
    if "device" in data:
        _check(isinstance(data["device"], str), path, "device", "a string such as \"cpu\"")
        s.device = data["device"]
    if "max_seconds" in data:
        v = data["max_seconds"]
        _check(isinstance(v, int | float) and not isinstance(v, bool) and v > 0, path, "max_seconds",
               "a positive number")
        s.max_seconds = float(v)
    if "completion_context_tokens" in data:
        v = data["completion_context_tokens"]
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= 16, path, "completion_context_tokens",
               "an integer >= 16")
        s.completion_context_tokens = v
    for table, kind in (("max_tokens", int), ("features", bool)):
        if table in data:
            t = data[table]
            _check(isinstance(t, dict), path, table, "a table")
            for k, v in t.items():
                _check(k in TASK_NAMES, path, f"{table}.{k}", f"one of {', '.join(TASK_NAMES)}")
                if kind is int:
                    _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, path, f"{table}.{k}",
                           "a positive integer")
                else:
                    _check(isinstance(v, bool), path, f"{table}.{k}", "true or false")
                getattr(s, table)[k] = v
    if "review" in data:
        r = data["review"]
        _check(isinstance(r, dict), path, "review", "a table")
        for k, v in r.items():
            if k == "min_confidence":
                _check(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1, path,
                       "review.min_confidence", "a number in [0, 1]")
                s.review.min_confidence = float(v)
            elif k == "jobs":
                _check(isinstance(v, int) and not isinstance(v, bool) and v > 0, path, "review.jobs",
                       "a positive integer")
                s.review.jobs = v
            elif k == "fail_on":
                _check(v in FAIL_LEVELS, path, "review.fail_on", f"one of {', '.join(FAIL_LEVELS)}")
                s.review.fail_on = v
            else:
                raise ConfigError(f"{path}: unknown setting 'review.{k}'")
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
