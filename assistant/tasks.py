"""The four tasks: complete, comment, debug, explain — request -> prompt -> events -> result.

Work in progress: the dataclasses below are the contract of docs/interfaces.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("complete", "comment", "debug", "explain")


@dataclass
class TaskRequest:
    """One request. Lines and columns are 0-based (``line`` is the cursor for ``complete``,
    the target line for the others; ``end_line`` is inclusive)."""

    task: str  # "complete" | "comment" | "debug" | "explain"
    source: str
    path: str | None = None
    line: int = 0
    column: int = 0
    end_line: int | None = None
    function: str | None = None
    related: list[tuple[str, str]] = field(default_factory=list)
    max_new_tokens: int | None = None
    max_seconds: float | None = None


@dataclass
class Completion:
    text: str
    multiline: bool
    reasoning: str = ""


@dataclass
class Docstring:
    """``text`` is the full docstring literal (quotes included, continuation lines already
    indented); insert ``indent + text + "\\n"`` before 0-based ``insert_line``. When the
    function already has a docstring, ``replace_start``/``replace_end`` (0-based, inclusive)
    are the lines it occupies."""

    function: str
    text: str
    insert_line: int
    indent: str
    style: str  # "google" | "numpy" | "rest" | "plain"
    reasoning: str
    replace_start: int | None = None
    replace_end: int | None = None


@dataclass
class Hint:
    """A debugging hint. ``line`` is 0-based in the file; ``fix`` is the full replacement
    line (original indentation kept) or None; ``confidence`` in [0, 1]."""

    path: str | None
    function: str
    line: int
    message: str
    fix: str | None
    confidence: float
    reasoning: str


@dataclass
class DebugResult:
    hints: list[Hint]
    reasoning: str


@dataclass
class Explanation:
    text: str
    reasoning: str
