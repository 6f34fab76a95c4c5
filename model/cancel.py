"""The cancel token generation checks between tokens (torch-free, so faces start fast)."""

from __future__ import annotations

import threading

__all__ = ["CancelToken"]


class CancelToken:
    """Set from any thread; generation checks it between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
