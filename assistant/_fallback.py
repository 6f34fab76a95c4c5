"""Stand-ins with the fields of ``model.generate`` (docs/interfaces.md), used only while
that module is missing so the assistant can be imported and tested against fakes."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


class CancelToken:
    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_seconds: float | None = None
    seed: int | None = None


@dataclass
class TokenEvent:
    token_id: int
    text: str
    logprob: float


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "eos"
