"""What the faces (``lsp``, ``tui``, ``serve``) may assume of an engine: the :class:`Engine`
protocol, the :class:`Event` it streams, :class:`EngineError` and :class:`CancelToken`.

This module is torch-free, so a face imports it at start-up and loads a model only when
it needs one. Three kinds of engine satisfy :class:`Engine` (structurally; none inherits
from it): the in-process :class:`assistant.engine.Engine`, the scripted doubles in
``tests/``, and a client of a remote ``moecoder`` server. A face never asks which kind it
holds (no ``getattr`` probing); ``tests/test_protocols.py`` checks each against it.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from model.cancel import CancelToken

if TYPE_CHECKING:
    from assistant.tasks import TaskRequest

__all__ = ["CancelToken", "Engine", "EngineError", "Event", "Tokenizer"]


class EngineError(RuntimeError):
    """A request failed; the message is one line and meant for the user."""


@dataclass
class Event:
    """One event of a request's stream: ``reasoning`` and ``answer`` deltas (reasoning
    always first), then exactly one ``done`` (``result`` is the task's dataclass) or one
    ``error`` (``text`` is one line; ``"cancelled"`` after a cancel)."""

    kind: str  # "reasoning" | "answer" | "done" | "error"
    text: str = ""
    result: object | None = None


@runtime_checkable
class Tokenizer(Protocol):
    """The part of ``model.tokenizer.Tokenizer`` the assistant's context window uses."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def count(self, text: str) -> int: ...

    def special_id(self, name: str) -> int: ...


@runtime_checkable
class Engine(Protocol):
    """An engine as the faces see it.

    ``stream`` is thread-safe and may be called from any thread; closing its iterator
    early cancels the request. ``run`` returns the ``done`` result or raises
    :class:`EngineError`. ``close`` waits for the current job and frees the model.
    """

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def context_length(self) -> int: ...

    # tokens kept for an answer when a request does not say (the TUI's budget report)
    default_max_new_tokens: int

    def count_tokens(self, text: str) -> int: ...

    def stream(self, request: TaskRequest, cancel: CancelToken | None = None) -> Generator[Event, None, None]: ...

    def run(self, request: TaskRequest, cancel: CancelToken | None = None) -> object: ...

    def close(self) -> None: ...
