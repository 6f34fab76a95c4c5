"""A scripted engine for the chat's tests, snapshots, benchmark and tmux check
(``python -m tests.tui_fake_chat``).

It satisfies :class:`assistant.protocols.Engine`: ``stream(request, cancel)``
yields reasoning events, then answer events, then one ``done`` event whose result is
the task's dataclass. Small sleeps between events make it behave like a model.
``hold_after`` makes it wait (for a cancel or ``release``) after a number of answer chunks, so a test can
press Escape while an answer is certainly running.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

from assistant.protocols import CancelToken, Event
from assistant.tasks import Completion, DebugResult, Docstring, Explanation, Hint, TaskRequest

REASONING = ["The user asks about ", "the code. ", "Let me read it ", "step by step."]
ANSWER = ["Here is the **answer**.\n\n", "```python\n", "def add(a, b):\n", "    return a + b\n", "```\n"]


class WordTokenizer:
    """A tokenizer-like object for the fake engine: words, spaces and punctuation are tokens.

    Byte exact (``decode(encode(t)) == t``); ids are handed out as new pieces appear.
    Special tokens (names of ``model.formats.SPECIAL_TOKENS``) get fixed ids that decode to "".
    """

    _PIECES = re.compile(r"\s+|\w+|[^\w\s]")
    SPECIALS = (
        "pad",
        "eos",
        "fim_prefix",
        "fim_suffix",
        "fim_middle",
        "file_sep",
        "think",
        "think_end",
        "comment",
        "debug",
        "explain",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: dict[str, int] = {}
        self._pieces: list[str] = [""] * len(self.SPECIALS)
        self.eos_id = self.SPECIALS.index("eos")
        self.pad_id = self.SPECIALS.index("pad")

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def special_id(self, name: str) -> int:
        return self.SPECIALS.index(name)

    def encode(self, text: str) -> list[int]:
        out = []
        with self._lock:
            for piece in self._PIECES.findall(text):
                i = self._ids.get(piece)
                if i is None:
                    i = self._ids[piece] = len(self._pieces)
                    self._pieces.append(piece)
                out.append(i)
        return out

    def decode(self, ids: list[int]) -> str:
        return "".join(self._pieces[i] for i in ids if 0 <= i < len(self._pieces))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i]

    def count(self, text: str) -> int:
        return len(self._PIECES.findall(text))


class ScriptedEngine:
    """Fake engine: deterministic events with small delays; honours the cancel token."""

    context_length = 2048
    default_max_new_tokens = 256

    def __init__(
        self,
        reasoning: list[str] | None = None,
        answer: list[str] | None = None,
        delay: float = 0.01,
        hold_after: int | None = None,
        hold_seconds: float = 10.0,
    ) -> None:
        self.reasoning = list(REASONING if reasoning is None else reasoning)
        self.answer = list(ANSWER if answer is None else answer)
        self.delay = delay
        self.hold_after = hold_after
        self.hold_seconds = hold_seconds
        self.requests: list[TaskRequest] = []
        self.holding = threading.Event()  # set while waiting at the hold point
        self.release = threading.Event()  # set it to let a held stream go on
        self.finished = threading.Event()  # set when a stream ends (any reason)
        self.tokenizer = WordTokenizer()
        self.closed = False

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count(text)

    def close(self) -> None:
        self.closed = True

    def _sleep(self, cancel: CancelToken | None) -> bool:
        if self.delay:
            time.sleep(self.delay)
        return bool(cancel is not None and cancel.cancelled)

    def stream(self, request: TaskRequest, cancel: CancelToken | None = None) -> Iterator[Event]:
        self.requests.append(request)
        self.finished.clear()
        try:
            for chunk in self.reasoning:
                if self._sleep(cancel):
                    return
                yield Event("reasoning", chunk)
            for i, chunk in enumerate(self.answer):
                if self.hold_after is not None and i == self.hold_after:
                    self.holding.set()
                    deadline = time.monotonic() + self.hold_seconds
                    while time.monotonic() < deadline and not self.release.is_set():
                        if cancel is not None and cancel.cancelled:
                            break
                        time.sleep(0.005)
                    self.holding.clear()
                if self._sleep(cancel):
                    return
                yield Event("answer", chunk)
            yield Event("done", result=self._result(request))
        finally:
            self.holding.clear()
            self.finished.set()

    def run(self, request: TaskRequest, cancel: CancelToken | None = None) -> object:
        result = None
        for ev in self.stream(request, cancel):
            if ev.kind == "done":
                result = ev.result
        return result

    def _result(self, request: TaskRequest) -> object:
        reasoning = "".join(self.reasoning)
        answer = "".join(self.answer)
        if request.task == "complete":
            return Completion(text=answer, multiline="\n" in answer, reasoning=reasoning)
        if request.task == "comment":
            return Docstring(
                function=request.function or "",
                text=answer,
                insert_line=request.line + 1,
                indent="    ",
                style="google",
                reasoning=reasoning,
            )
        if request.task == "debug":
            hint = Hint(
                path=request.path,
                function=request.function or "",
                line=request.line,
                message=answer.strip(),
                fix=None,
                confidence=0.5,
                reasoning=reasoning,
            )
            return DebugResult(hints=[hint], reasoning=reasoning)
        return Explanation(text=answer, reasoning=reasoning)


class FailingEngineError(ValueError):
    """What a bad checkpoint raises (a ValueError subclass with one clear line)."""


def failing_loader(model_dir: object) -> ScriptedEngine:
    raise FailingEngineError(f"{model_dir}: not a moecoder checkpoint (no config.json)")
