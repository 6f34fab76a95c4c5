"""Conversations on disk: one JSON file per conversation in the user data directory.

Directory: ``$MOECODER_DATA_DIR`` if set, else ``$XDG_DATA_HOME/moecoder``, else
``~/.local/share/moecoder``; conversations live in its ``conversations/`` folder.
Files are written atomically (temp file + rename) and never overwrite another
conversation: each one gets its own name when it starts.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1


def data_dir() -> Path:
    """The user data directory of moecoder (not created here)."""
    env = os.environ.get("MOECODER_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "moecoder"


def conversations_dir(root: Path | None = None) -> Path:
    return (root or data_dir()) / "conversations"


@dataclass
class Turn:
    """One message: ``role`` is "user", "assistant" or "note" (app messages)."""

    role: str
    text: str = ""
    reasoning: str = ""
    task: str = ""
    status: str = "done"  # assistant turns: "done" | "stopped" | "error"

    @classmethod
    def from_dict(cls, d: dict) -> Turn:
        return cls(
            role=str(d.get("role", "note")),
            text=str(d.get("text", "")),
            reasoning=str(d.get("reasoning", "")),
            task=str(d.get("task", "")),
            status=str(d.get("status", "done")),
        )


@dataclass
class Conversation:
    id: str
    created: float
    updated: float
    model: str | None = None
    attachments: list[str] = field(default_factory=list)  # as the user typed them
    attachments_abs: list[str] = field(default_factory=list)  # the same, resolved
    turns: list[Turn] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # prompt history (up/down)

    @classmethod
    def new(cls, clock: Callable[[], float] = time.time) -> Conversation:
        now = clock()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        return cls(id=f"{stamp}-{secrets.token_hex(3)}", created=now, updated=now)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Conversation:
        if not isinstance(d, dict) or "id" not in d:
            raise ValueError("not a moecoder conversation file")
        return cls(
            id=str(d["id"]),
            created=float(d.get("created", 0.0)),
            updated=float(d.get("updated", 0.0)),
            model=d.get("model"),
            attachments=[str(a) for a in d.get("attachments", [])],
            attachments_abs=[str(a) for a in d.get("attachments_abs", [])],
            turns=[Turn.from_dict(t) for t in d.get("turns", [])],
            history=[str(h) for h in d.get("history", [])],
        )


class Store:
    """Save and find conversations under ``root/conversations``."""

    def __init__(self, root: Path | None = None) -> None:
        self.dir = conversations_dir(root)

    def path_of(self, conv: Conversation) -> Path:
        return self.dir / f"{conv.id}.json"

    def save(self, conv: Conversation) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path_of(conv)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(conv.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def load(self, path: Path) -> Conversation:
        try:
            return Conversation.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"cannot read conversation {path.name}: {e}") from None

    def latest(self) -> Conversation | None:
        """The most recently updated conversation that can be read, or None."""
        if not self.dir.is_dir():
            return None
        found: list[tuple[float, str, Conversation]] = []
        for p in self.dir.glob("*.json"):
            try:
                conv = self.load(p)
            except ValueError:
                continue
            found.append((conv.updated, conv.id, conv))
        if not found:
            return None
        return max(found, key=lambda t: (t[0], t[1]))[2]
