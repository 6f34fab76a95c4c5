"""The one door from the TUI into ``assistant``.

Every other tui module takes the assistant's names from here, so the surface the TUI
depends on is visible in one place (see docs/interfaces.md): ``Engine``, ``Event``,
``CancelToken``, ``TaskRequest``, the task results and ``build_context``'s report.
The in-process engine is imported lazily (it pulls in torch), so the app starts fast;
the app itself only knows the :class:`assistant.protocols.Engine` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

from assistant.code import find_function, functions  # noqa: F401  (re-exported)
from assistant.config import Settings, face_settings, load_settings  # noqa: F401  (re-exported)
from assistant.diagnostics import Policy, check_file
from assistant.protocols import CancelToken, Engine, Event  # noqa: F401  (re-exported)
from assistant.tasks import (  # noqa: F401  (re-exported)
    Completion,
    DebugResult,
    Docstring,
    Explanation,
    Hint,
    TaskRequest,
)


def stream_turn(engine: Engine, request: TaskRequest, cancel: CancelToken, policy: Policy
                ) -> Generator[Event, None, None]:
    """The events of one chat turn. A debug request without a function checks the whole
    file as the review and the LSP do (``assistant.diagnostics``); every debug result
    shows only the hints ``policy`` keeps (the same hints as the other faces)."""
    if request.task == "debug" and request.function is None and request.end_line is None:
        yield from check_file(engine, request.source, request.path, policy, max_new_tokens=request.max_new_tokens,
                              max_seconds=request.max_seconds, cancel=cancel)
        return
    for ev in engine.stream(request, cancel):
        if ev.kind == "done" and isinstance(ev.result, DebugResult):
            ev = Event("done", result=DebugResult(policy.keep(ev.result.hints), ev.result.reasoning))
        yield ev


@dataclass
class RunDebugRequest:
    """``/debug --run``: debugging from evidence (the function's doctest examples and the tests
    that call it run in a sandbox; fixes verified by running them). Runs the user's code, so
    only on that explicit flag."""

    source: str
    path: str
    functions: list[str] = field(default_factory=list)
    task: str = "debug"

    def stream(self, engine: Engine, cancel: CancelToken | None = None):
        from assistant.debugging import DebugOptions, debug_stream

        return debug_stream(engine, self.path, self.source, self.functions, DebugOptions())


# Tokens kept free for the answer when reporting the prompt budget.
DEFAULT_ANSWER_TOKENS = 256


def engine_factory(config: Settings | None = None, device: str | None = None
                   ) -> Callable[[str | Path | None], Engine]:
    """Loads the real engine (slow: torch + weights) with the config file's settings (the
    ``[chat]`` face); raises ValueError for a bad checkpoint."""

    def load(model_dir: str | Path | None) -> Engine:
        from assistant.remote import engine_from_settings  # in-process, or a running `moecoder serve`

        settings = config or load_settings().for_face("chat")
        return engine_from_settings(settings, None if model_dir is None else str(model_dir), device)

    return load


load_engine = engine_factory()  # the default: the config file's model unless a path is given


@dataclass
class Budget:
    """What the files panel shows: the context manager's report plus tokens per file."""

    used_tokens: int
    budget: int
    trimmed: list[str] = field(default_factory=list)
    file_tokens: dict[str, int] = field(default_factory=dict)
    context_length: int = 0  # the model's window; ``budget`` is what is left after the answer


def budget_report(engine: Engine, files: list[tuple[str, str]]) -> Budget:
    """Fit the attached files into the model's window as the tasks do and report it.

    ``files`` are ``(path, text)``; the newest is the file being worked on (cursor at its
    end), the others go in as related code. Uses ``assistant.context.build_context``.
    """
    from assistant.context import build_context

    file_tokens = {path: int(engine.count_tokens(text)) for path, text in files}
    if not files:
        return Budget(0, int(engine.context_length), [], file_tokens, int(engine.context_length))
    ctx = int(engine.context_length)
    answer = int(engine.default_max_new_tokens or DEFAULT_ANSWER_TOKENS)
    answer = max(1, min(answer, ctx // 2))  # as the tasks reserve room for the answer
    budget = ctx - answer - 1
    path, text = files[-1]
    lines = text.split("\n")
    result = build_context(
        engine.tokenizer,
        text,
        len(lines) - 1,
        len(lines[-1]),
        budget=budget,
        related=list(files[:-1]),
    )
    report = result.report
    # say which file each note is about: notes on related files name them, the rest are about `path`
    related = [p for p, _ in files[:-1]]
    trimmed = [t if any(r in t for r in related) else f"{path}: {t}" for t in report.trimmed]
    return Budget(
        int(report.used_tokens),
        int(report.budget),
        trimmed,
        file_tokens,
        int(engine.context_length),
    )
