"""Slash commands, attached files and routing free text to a task (no UI here)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from assistant.files import Unreadable, read_bytes
from tui import api

MAX_FILE_BYTES = 2 * 1024 * 1024

COMMANDS: dict[str, tuple[str, str]] = {
    "add": ("PATH", "attach a file (its text goes into the model's context)"),
    "drop": ("PATH", "detach a file"),
    "files": ("", "list attached files and the context budget"),
    "complete": ("FILE:LINE", "complete the code at the end of LINE (1-based)"),
    "comment": ("FUNC", "write a docstring for function FUNC of an attached file"),
    "debug": ("[--run] [FUNC]", "look for a bug in FUNC (or in the last attached file); --run runs its "
                                "doctest examples and tests in a sandbox and verifies fixes (executes the code)"),
    "explain": ("[FILE[:A-B]]", "explain a file or lines A-B of it (default: last attached)"),
    "clear": ("", "start a new conversation (the old one stays saved)"),
    "model": ("PATH", "load another model checkpoint directory"),
    "help": ("", "show this help"),
}


class CommandError(ValueError):
    """Bad input to a command: the message is shown in the chat as one line."""


@dataclass
class Command:
    name: str
    args: list[str]
    raw: str


def parse_command(text: str) -> Command:
    """Parse ``/name args...``; raises CommandError for an unknown command."""
    body = text.strip()[1:]
    try:
        parts = shlex.split(body)
    except ValueError:
        parts = body.split()
    if not parts:
        raise CommandError("empty command; type /help for the list")
    name = parts[0].lower()
    if name not in COMMANDS:
        raise CommandError(f"unknown command /{name}; type /help for the list")
    return Command(name, parts[1:], text)


def help_markdown() -> str:
    lines = ["**Commands**", ""]
    for name, (args, what) in COMMANDS.items():
        usage = f"/{name} {args}".strip()
        lines.append(f"- `{usage}` — {what}")
    lines += [
        "",
        "Any other text is a question: with files attached it goes to the task that fits "
        "(debug, comment, complete) or to explain.",
        "",
        "**Keys**: Enter send · Ctrl+J new line · Up/Down history · Esc stop · "
        "Ctrl+R reasoning · Ctrl+B files panel · Ctrl+Q quit",
    ]
    return "\n".join(lines)


@dataclass
class Attachment:
    path: str  # as the user typed it (relative paths stay relative)
    text: str
    file: Path | None = None  # where it was read from
    mtime_ns: int = 0

    @property
    def name(self) -> str:
        return Path(self.path).name

    def refresh(self, max_bytes: int = MAX_FILE_BYTES) -> bool:
        """Re-read the file if it changed on disk since it was attached; True if it did.

        A file that went missing or became unreadable keeps the text it had.
        """
        if self.file is None:
            return False
        try:
            mtime = self.file.stat().st_mtime_ns
            if mtime == self.mtime_ns:
                return False
            new = read_attachment(str(self.file), max_bytes=max_bytes)
        except (OSError, CommandError):
            return False
        self.text, self.mtime_ns = new.text, new.mtime_ns
        return True


def read_attachment(path: str, base: Path | None = None, max_bytes: int = MAX_FILE_BYTES) -> Attachment:
    """Read a text file to attach; CommandError with one clear line if it cannot be used."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    if not p.exists():
        raise CommandError(f"no such file: {path}")
    if p.is_dir():
        raise CommandError(f"{path} is a directory; attach files one by one")
    try:
        st = p.stat()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}") from None
    size, size_mtime = st.st_size, st.st_mtime_ns
    if size > max_bytes:
        raise CommandError(f"{path} is too large ({size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB)")
    try:  # regular files only, never blocking: a FIFO or /dev/zero gets one line, not a frozen chat
        data = read_bytes(p, max_bytes)
    except Unreadable as e:
        raise CommandError(f"cannot read {path}: {e}") from None
    if b"\x00" in data:
        raise CommandError(f"{path} looks binary (NUL bytes); only text files can be attached")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CommandError(f"{path} is not UTF-8 text") from None
    return Attachment(path=path, text=text, file=p, mtime_ns=size_mtime)


def function_names(source: str) -> list[str]:
    """Qualified names (``Class.method``) of the functions a Python source defines
    (``assistant.code``; none if it does not parse)."""
    try:
        return [f.qualname for f in api.functions(source)]
    except Exception:  # noqa: BLE001 - not Python: no functions
        return []


def find_function(attachments: list[Attachment], func: str) -> Attachment | None:
    """The newest attached file that defines ``func`` (``name`` or ``Class.method``)."""
    for att in reversed(attachments):
        try:
            if api.find_function(att.text, func) is not None:
                return att
        except Exception:  # noqa: BLE001 - not Python
            continue
    return None


def find_attachment(attachments: list[Attachment], path: str) -> Attachment | None:
    for att in reversed(attachments):
        if att.path == path or att.name == path or Path(att.path) == Path(path):
            return att
    return None


_DEBUG_WORDS = re.compile(
    r"\b(bug|bugs|buggy|debug|wrong|fix|broken|error|crash|fails?|failing|issue)\b", re.I
)
_COMMENT_WORDS = re.compile(r"\b(docstring|document|comment|doc)\b", re.I)
_COMPLETE_WORDS = re.compile(r"\b(complete|finish|continue)\b", re.I)


def route_free_text(text: str, attachments: list[Attachment]) -> tuple[str, Attachment | None, str | None]:
    """Pick ``(task, file, function)`` for a free-text question (the question itself goes
    to the model with the request, whatever the task).

    The file is the attached file named in the text (or defining a function named in
    it: ``Class.method`` or a plain name, found by ``assistant.code``), else the newest
    attachment. Words pick the task: bug/fix/wrong -> debug, docstring/comment ->
    comment (needs a function), otherwise explain.
    """
    if not attachments:
        return "explain", None, None
    names = set(re.findall(r"[A-Za-z_][\w.]*\w|[A-Za-z_]", text))
    words = names | {part for n in names for part in n.split(".")}
    target: Attachment | None = None
    func: str | None = None
    for att in reversed(attachments):
        if att.path in text or att.name in text:
            target = att
            break
    for att in reversed([target] if target else attachments):
        quals = function_names(att.text)
        # a qualified name written out beats a bare method name
        hit = [q for q in quals if q in names] or [q for q in quals if q.rsplit(".", 1)[-1] in words]
        if hit:
            target, func = att, hit[0]
            break
    target = target or attachments[-1]
    if _DEBUG_WORDS.search(text):
        return "debug", target, func
    if _COMMENT_WORDS.search(text) and func:
        return "comment", target, func
    return "explain", target, func


def parse_file_line(arg: str) -> tuple[str, int]:
    """``FILE:LINE`` -> (file, 1-based line); CommandError otherwise."""
    path, sep, line = arg.rpartition(":")
    if not sep or not path or not line.isdigit() or int(line) < 1:
        raise CommandError(f"expected FILE:LINE with a line number from 1, got {arg!r}")
    return path, int(line)


def parse_line_range(arg: str) -> tuple[str, int | None, int | None]:
    """``FILE`` or ``FILE:A-B`` or ``FILE:A`` -> (file, start, end) 1-based inclusive."""
    m = re.fullmatch(r"(.+?):(\d+)(?:-(\d+))?", arg)
    if not m:
        return arg, None, None
    a = int(m.group(2))
    b = int(m.group(3)) if m.group(3) else a
    if a < 1 or b < a:
        raise CommandError(f"bad line range in {arg!r}")
    return m.group(1), a, b
