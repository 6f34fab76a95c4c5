"""Data the tests take from ``../shared`` (eval sets, the SARIF schema).

CI keeps ``../shared`` beside the repository, so a test that needs it fails (loudly, with
the path) when it is missing; a developer without it sets ``MOECODER_SKIP_SHARED=1`` to
skip those tests instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest


def require_shared(path: Path, what: str) -> None:
    if Path(path).exists():
        return
    msg = f"{what} not found at {path} (../shared must sit beside the repository)"
    if os.environ.get("MOECODER_SKIP_SHARED") == "1":
        pytest.skip(msg)
    pytest.fail(msg + "; set MOECODER_SKIP_SHARED=1 to skip", pytrace=False)


def needs_shared(path: Path, what: str):
    """Decorator form of :func:`require_shared`."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            require_shared(path, what)
            return fn(*args, **kwargs)

        return wrapper

    return deco
