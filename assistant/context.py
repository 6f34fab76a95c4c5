"""The context-window manager (work in progress; contract in docs/interfaces.md)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ContextReport:
    used_tokens: int
    budget: int
    trimmed: list[str] = field(default_factory=list)
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    related_tokens: int = 0


@dataclass
class ContextResult:
    prompt_ids: list[int]
    report: ContextReport
    prefix: str = ""
    suffix: str = ""


def build_context(tokenizer, source: str, line: int, column: int = 0, *, budget: int,
                  related: list[tuple[str, str]] | tuple = (), prefix_share: float = 0.7,
                  related_share: float = 0.15) -> ContextResult:
    """The FIM prompt for a cursor at (0-based) ``line``, ``column`` that fits ``budget`` tokens."""
    raise NotImplementedError("build_context: in progress (issue #5)")
