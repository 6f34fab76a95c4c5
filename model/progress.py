"""The one progress printer of the long commands (``data corpus``, ``data pack``, ``data
tasks``): ``rich.progress``'s live bar on a terminal; on a pipe or in a log, a plain line
per 10 % (or every 10 s when the total is unknown), so logs stay readable."""

from __future__ import annotations

import sys
import time


class Progress:
    """``update(done, extra)`` as work proceeds, ``close()`` at the end (also a context manager)."""

    def __init__(self, label: str, total: int | None, stream=None, enabled: bool = True):
        self.label, self.total = label, None if total is None else max(total, 0)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = self.t0
        self.next_pct = 10
        self._bar = self._task = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[extra]}"), TimeElapsedColumn(),
                                     console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(label, total=self.total, extra="")
            self._bar.start()

    def update(self, done: int, extra: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done, extra=extra)
            return
        now = time.perf_counter()
        if self.total:
            if done * 100 < self.next_pct * self.total:
                return
            while done * 100 >= self.next_pct * self.total:
                self.next_pct += 10
        elif now - self.last < 10.0:
            return
        self.last = now
        total = "" if self.total is None else f"/{self.total}"
        self.stream.write(f"{self.label}: {done}{total} {extra} {now - self.t0:.1f}s\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
