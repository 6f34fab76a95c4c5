"""A scripted engine for fast, deterministic protocol tests (``tests/lsp_fake_server.py``).

It satisfies :class:`assistant.protocols.Engine` and answers every task from the request
alone, never from a model:

- ``complete``: ``"<word>_L<line>_C<column>"`` where line/column are the 0-based cursor
  the server sent (so tests can check position conversion), ``<word>`` is ``done``
  unless the source holds ``FAKE_WORD=<word>``; plus ``"\\nsecond_line"`` (multi-line)
  when nothing but whitespace follows the cursor on its line; a one-line completion ends
  with ``<closers>`` when the source holds ``FAKE_CLOSE=<closers>`` (``)``, ``]``, ``}``: a
  completion that closes the bracket the code after the cursor already closes).
- ``comment``: a one-line docstring for the function named in the request.
- ``debug``: one hint per line containing ``FAKE_BUG`` in the requested function (fix:
  ``FAKE_BUG`` -> ``fixed``).
- ``explain``: a sentence naming the requested lines.

``FAKE_DELAY=<seconds>`` anywhere in the source makes every task take that long before
its answer (``FAKE_DELAY_DEBUG=<seconds>`` etc. for one task), checking the cancel token every 10 ms, so cancellation, supersede and stale
results can be tested without timing races. ``FAKE_PREFILL=<seconds>`` is a sleep at the
start that does not look at the token (a model's prefill). ``FAKE_ERROR`` makes a task end in an error
event. :meth:`FakeEngine.stats` counts started, finished and cancelled streams.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

from assistant.protocols import CancelToken, Event
from assistant.tasks import Completion, DebugResult, Docstring, Explanation, Hint, TaskRequest
from tests.tui_fakes import WordTokenizer

_DELAY = re.compile(r"FAKE_DELAY=([0-9.]+)")
_PREFILL = re.compile(r"FAKE_PREFILL=([0-9.]+)")
_WORD = re.compile(r"FAKE_WORD=(\w+)")
_CLOSE = re.compile(r"FAKE_CLOSE=([)\]}]+)")
_DEF = re.compile(r"^([ \t]*)(?:async[ \t]+)?def[ \t]+(\w+)")


def _span(lines: list[str], qualname: str) -> tuple[int, int]:
    """Lines of the function ``qualname`` (its last name part), by indentation; (0, -1) if absent."""
    name = qualname.rsplit(".", 1)[-1]
    for i, text in enumerate(lines):
        d = _DEF.match(text)
        if d and d.group(2) == name:
            indent, end = len(d.group(1)), i
            for j in range(i + 1, len(lines)):
                if lines[j].strip():
                    if len(lines[j]) - len(lines[j].lstrip()) <= indent:
                        break
                    end = j
            return i, end
    return 0, -1


class FakeEngine:
    context_length = 2048
    default_max_new_tokens = 256

    def __init__(self, model_dir: str | None = None, device: str = "cpu", **_: object) -> None:
        self.model_dir = model_dir
        self.device = device
        self._lock = threading.Lock()
        self._stats = {"started": 0, "finished": 0, "cancelled": 0, "requests": [], "repo": [], "reads": []}

    def stats(self) -> dict:
        with self._lock:
            out = {k: (list(v) if isinstance(v, list) else v) for k, v in self._stats.items()}
        out["model_dir"] = self.model_dir
        return out

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def close(self) -> None:
        pass

    def read_repository(self, root: str, read_s: float, stop=None) -> dict:
        """Like Engine.read_repository: the workspace is "complete" after its third slice."""
        with self._lock:
            self._stats["reads"].append([root, read_s, time.monotonic()])
            n = len(self._stats["reads"])
        return {"complete": n >= 3, "entries": 10 * n, "files": n}

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer()

    def run(self, request: TaskRequest, cancel: CancelToken | None = None) -> object:
        result = None
        for ev in self.stream(request, cancel):
            if ev.kind == "done":
                result = ev.result
        return result

    def stream(self, request: TaskRequest, cancel: CancelToken | None = None) -> Iterator[Event]:
        cancel = cancel or CancelToken()
        with self._lock:
            self._stats["started"] += 1
            self._stats["requests"].append([request.task, request.line, request.column, request.context_tokens])
            self._stats["repo"].append([request.repo, request.repo_read_s])
        yield Event("reasoning", text=f"thinking about {request.task}")
        p = _PREFILL.search(request.source)
        if p:  # like a model's prefill: not interruptible
            time.sleep(float(p.group(1)))
        m = re.search(rf"FAKE_DELAY_{request.task.upper()}=([0-9.]+)", request.source) or _DELAY.search(request.source)
        end = time.monotonic() + (float(m.group(1)) if m else 0.0)
        while time.monotonic() < end:
            if cancel.cancelled:
                break
            time.sleep(0.01)
        if cancel.cancelled:
            self._count("cancelled")
            yield Event("error", text="cancelled")
            return
        if "FAKE_ERROR" in request.source:
            self._count("finished")
            yield Event("error", text="scripted failure")
            return
        result = self._answer(request)
        self._count("finished")
        yield Event("answer", text=str(getattr(result, "text", "")))  # a DebugResult has no text
        yield Event("done", result=result)

    def _answer(self, r: TaskRequest) -> object:
        lines = r.source.split("\n")
        if r.task == "complete":
            m = _WORD.search(r.source)
            word = m.group(1) if m else "done"
            rest = lines[r.line][r.column:] if 0 <= r.line < len(lines) else ""
            multiline = not rest.strip()  # the real rule lives in assistant.tasks.is_multiline
            close = _CLOSE.search(r.source)
            text = f"{word}_L{r.line}_C{r.column}" + ("\nsecond_line" if multiline else close.group(1) if close else "")
            return Completion(text=text, multiline=multiline, reasoning="")
        if r.task == "comment":
            name, def_line, indent = r.function or "", r.line, ""
            for i, text in enumerate(lines):
                d = _DEF.match(text)
                if d and (d.group(2) == r.function or (r.function is None and i <= r.line)):
                    name, def_line, indent = d.group(2), i, d.group(1)
                    if r.function is not None:
                        break
            body_indent = indent + "    "
            return Docstring(function=name, text=f'"""Fake docstring for {name}."""', insert_line=def_line + 1,
                             indent=body_indent, style="plain", reasoning=f"{name} is a function")
        if r.task == "debug":
            hints = []
            lo, hi = _span(lines, r.function) if r.function else (0, len(lines) - 1)
            for i, text in enumerate(lines):
                if "FAKE_BUG" in text and lo <= i <= hi:
                    hints.append(Hint(path=r.path, function="f", line=i, message="FAKE_BUG looks wrong",
                                      fix=text.replace("FAKE_BUG", "fixed"), confidence=0.8,
                                      reasoning="the marker FAKE_BUG is never defined"))
            return DebugResult(hints=hints, reasoning=f"checked {len(lines)} lines")
        if r.task == "explain":
            end = r.end_line if r.end_line is not None else r.line
            return Explanation(text=f"Explains lines {r.line}-{end}.", reasoning="read the code first")
        raise ValueError(f"unknown task {r.task!r}")
