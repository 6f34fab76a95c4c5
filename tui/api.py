"""The one door from the TUI into ``assistant``.

Every other tui module takes the assistant's names from here, so the surface the TUI
depends on is visible in one place (see docs/interfaces.md): ``Engine``, ``Event``,
``CancelToken``, ``TaskRequest``, the task results and ``build_context``'s report.
The engine itself is imported lazily (it pulls in torch), so the app starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant.engine import CancelToken, Event  # noqa: F401  (re-exported)
from assistant.tasks import (  # noqa: F401  (re-exported)
    Completion,
    DebugResult,
    Docstring,
    Explanation,
    Hint,
    TaskRequest,
)

# Tokens kept free for the answer when reporting the prompt budget.
DEFAULT_ANSWER_TOKENS = 256


def load_engine(model_dir: str | Path | None) -> Any:
    """Load the real engine (slow: torch + weights). Raises ValueError for a bad checkpoint."""
    from assistant.engine import Engine

    return Engine(model_dir=None if model_dir is None else str(model_dir))


@dataclass
class Budget:
    """What the files panel shows: the context manager's report plus tokens per file."""

    used_tokens: int
    budget: int
    trimmed: list[str] = field(default_factory=list)
    file_tokens: dict[str, int] = field(default_factory=dict)
    context_length: int = 0  # the model's window; ``budget`` is what is left after the answer


def budget_report(engine: Any, files: list[tuple[str, str]]) -> Budget:
    """Fit the attached files into the model's window as the tasks do and report it.

    ``files`` are ``(path, text)``; the newest is the file being worked on (cursor at its
    end), the others go in as related code. Uses ``assistant.context.build_context``.
    """
    from assistant.context import build_context

    file_tokens = {path: int(engine.count_tokens(text)) for path, text in files}
    if not files:
        return Budget(0, int(engine.context_length), [], file_tokens, int(engine.context_length))
    ctx = int(engine.context_length)
    answer = int(getattr(engine, "default_max_new_tokens", DEFAULT_ANSWER_TOKENS) or DEFAULT_ANSWER_TOKENS)
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
