"""Debugging hints for a whole file: one set of rules for the review, the LSP and the chat.

- **Which functions** are checked: :func:`assistant.code.task_functions` (module-level
  functions and methods, as the model was trained); after an edit, only those whose text
  changed (:class:`HintCache`, the LSP), or those a diff touches in their own lines
  (:func:`functions_touching`, ``review --diff``).
- **The request** for one function: :func:`debug_request` (so every face sends the same
  prompt for the same function).
- **Which hints are shown**: :meth:`Policy.keep` drops hints below ``min_confidence`` (the
  config file's ``[review] min_confidence``, default 0.5), in every face.
- **Severity**: :meth:`Policy.level`: every kept hint is a ``"warning"`` (the review's
  level, SARIF's, the LSP's ``DiagnosticSeverity.Warning``); the confidence is shown with
  the message.

:func:`check_file` runs a whole file through any :class:`assistant.protocols.Engine`
(the chat's ``/debug`` without a function); the review batches the same requests.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from assistant import code as codemod
from assistant.tasks import DebugResult, Hint, TaskRequest

if TYPE_CHECKING:
    from assistant.protocols import CancelToken, Engine, Event

DEFAULT_MIN_CONFIDENCE = 0.5  # assistant.config.ReviewSettings.min_confidence


@dataclass(frozen=True)
class Policy:
    """Which hints a face shows, and how loud."""

    min_confidence: float = DEFAULT_MIN_CONFIDENCE

    @classmethod
    def from_settings(cls, settings: object) -> Policy:
        """From :class:`assistant.config.Settings` (its ``review.min_confidence``)."""
        return cls(settings.review.min_confidence)  # type: ignore[attr-defined]

    def keep(self, hints: Iterable[Hint]) -> list[Hint]:
        return [h for h in hints if h.confidence >= self.min_confidence]

    @staticmethod
    def level(confidence: float) -> str:
        """The level of a kept hint (one for all: a model's hint is never an error)."""
        return "warning"


@dataclass(frozen=True)
class Check:
    """One function to check: its qualified name and 0-based lines (decorators included)."""

    name: str
    start_line: int  # the ``def`` line
    first: int  # the first decorator's line, else the ``def`` line
    last: int
    key: tuple[str, str]  # (name, text): unchanged text -> the same hints

    @classmethod
    def of(cls, scope: codemod.Scope, src_lines: list[str]) -> Check:
        first = scope.decorated_start if 0 <= scope.decorated_start <= scope.start_line else scope.start_line
        text = "\n".join(src_lines[first:scope.end_line + 1])
        return cls(scope.qualname, scope.start_line, first, scope.end_line, (scope.qualname, text))


def checks(source: str) -> list[Check]:
    """The functions of ``source`` to check, in source order (none if it does not parse)."""
    try:
        funcs = codemod.task_functions(source)
    except Exception:  # noqa: BLE001 - unparsable source: nothing to check
        return []
    src_lines = source.split("\n")
    return [Check.of(f, src_lines) for f in funcs]


def functions_touching(source: str, lines: set[int]) -> list[codemod.Scope]:
    """The task functions with a changed line (0-based) of their own: not one that only
    lies in a function nested inside them."""
    funcs = codemod.task_functions(source)
    picked = []
    for f in funcs:
        inner = [g for g in funcs if g is not f and f.start_line <= g.decorated_start and g.end_line <= f.end_line]
        own = [ln for ln in lines if f.decorated_start <= ln <= f.end_line
               and not any(g.decorated_start <= ln <= g.end_line for g in inner)]
        if own:
            picked.append(f)
    return picked


def debug_request(source: str, path: str | None, name: str, start_line: int, *,
                  max_new_tokens: int | None = None, max_seconds: float | None = None,
                  min_confidence: float | None = None) -> TaskRequest:
    """The debug request for one function (by name, its ``def`` line breaking ties); with
    ``min_confidence`` (the face's threshold) a function the gate already clears is not
    generated for on the batch road (:func:`assistant.tasks.iter_batch`)."""
    return TaskRequest("debug", source, path, line=start_line, function=name, max_new_tokens=max_new_tokens,
                       max_seconds=max_seconds, min_confidence=min_confidence)


def moved(hint: Hint, line: int) -> Hint:
    """``hint`` at another line (its function moved, its text did not)."""
    if hint.line == line:
        return hint
    out = copy.copy(hint)
    out.line = line
    return out


@dataclass
class HintCache:
    """Hints per document and function text: after an edit only changed functions run."""

    _docs: dict[str, dict[tuple[str, str], list[tuple[int, Hint]]]] = field(default_factory=dict)

    def plan(self, doc: str, source: str) -> tuple[list[Hint], list[Check]]:
        """(hints reused from unchanged functions, shifted to where they are now; the checks
        still to run). Forgets the document's other entries."""
        old = self._docs.get(doc, {})
        fresh: dict[tuple[str, str], list[tuple[int, Hint]]] = {}
        self._docs[doc] = fresh  # filled as functions finish: a cancelled run keeps them
        reused: list[Hint] = []
        todo: list[Check] = []
        for c in checks(source):
            if c.key in old:
                fresh[c.key] = old[c.key]
                reused += [moved(h, c.first + rel) for rel, h in old[c.key]]
            else:
                todo.append(c)
        return reused, todo

    def record(self, doc: str, check: Check, hints: list[Hint]) -> None:
        self._docs.setdefault(doc, {})[check.key] = [(h.line - check.first, h) for h in hints]

    def forget(self, doc: str) -> None:
        self._docs.pop(doc, None)


def check_file(engine: Engine, source: str, path: str | None, policy: Policy, *,
               max_new_tokens: int | None = None, max_seconds: float | None = None,
               cancel: CancelToken | None = None) -> Iterator[Event]:
    """Every function of ``source`` through ``engine``: each one's reasoning events (headed by
    its name), then one ``done`` with the hints ``policy`` keeps (or the first ``error``)."""
    from assistant.protocols import Event

    hints: list[Hint] = []
    reasoning: list[str] = []
    for c in checks(source):
        head = f"{c.name}: "
        reasoning.append(head)
        yield Event("reasoning", head)
        req = debug_request(source, path, c.name, c.start_line, max_new_tokens=max_new_tokens,
                            max_seconds=max_seconds)
        for ev in engine.stream(req, cancel):
            if ev.kind == "reasoning":
                reasoning.append(ev.text)
                yield ev
            elif ev.kind == "error":
                yield ev
                return
            elif ev.kind == "done" and isinstance(ev.result, DebugResult):
                hints += ev.result.hints
        reasoning.append("\n")
        yield Event("reasoning", "\n")
    yield Event("done", result=DebugResult(hints=policy.keep(hints), reasoning="".join(reasoning)))
