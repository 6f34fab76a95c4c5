"""Reading the user's source files safely: one reader for every tool.

Only regular files are read. A path is resolved (symlinks followed) and what it points at is
checked again on the open file descriptor, so a named pipe, ``/dev/zero``, a socket or a
directory gets a one-line reason instead of a hang or an unbounded read. The open never
blocks (``O_NONBLOCK``), the read is capped at ``max_bytes`` whatever ``stat`` said, and the
text must be UTF-8 (a byte-order mark is dropped).

    from assistant.files import Unreadable, read_text
    try:
        text = read_text(path, max_bytes=2_000_000)
    except Unreadable as e:
        print(f"{path}: {e}")          # e.g. "not a regular file (a named pipe)"

``walk_files`` lists the files under a directory without stopping at a directory it may not
read: each such directory is reported once through ``on_skip`` and the walk goes on.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_MAX_BYTES = 4_000_000

__all__ = ["DEFAULT_MAX_BYTES", "Unreadable", "describe_kind", "read_bytes", "read_text", "walk_files"]


class Unreadable(ValueError):
    """A file that cannot be used as source; ``str(e)`` is a one-line reason (no path)."""


def describe_kind(mode: int) -> str:
    """'a named pipe', 'a character device', ... for a non-regular ``st_mode``."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _not_regular(path: Path, real: str, mode: int) -> Unreadable:
    kind = describe_kind(mode)
    via = f", via a symlink to {real}" if os.path.abspath(path) != real else ""
    if kind == "a directory":
        return Unreadable(f"is a directory{via}")
    return Unreadable(f"not a regular file ({kind}{via})")


def _os_reason(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOENT:
        return "no such file"
    if e.errno == errno.ELOOP:
        return "too many levels of symbolic links"
    return f"cannot read: {e.strerror or e}"


def read_bytes(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES, *, head: bool = False) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; Unreadable otherwise. Never blocks.
    ``head=True``: the first ``max_bytes`` bytes of a file of any size."""
    p = Path(path)
    real = os.path.realpath(p)
    try:
        st = os.stat(real)
    except OSError as e:
        if e.errno == errno.ENOENT and p.is_symlink():
            raise Unreadable(f"broken symbolic link (to {os.readlink(p)})") from None
        raise Unreadable(_os_reason(e)) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(p, real, st.st_mode)
    if st.st_size > max_bytes and not head:
        raise Unreadable(f"too large ({st.st_size} bytes; the limit is {max_bytes})")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)  # ``real`` has no symlinks left; one swapped in fails
    try:
        fd = os.open(real, flags)
    except OSError as e:
        raise Unreadable(_os_reason(e)) from None
    try:
        st = os.fstat(fd)  # what was opened, not what the path named a moment ago
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(p, real, st.st_mode)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if head and total >= max_bytes:
                return b"".join(chunks)[:max_bytes]
            if total > max_bytes:
                raise Unreadable(f"too large (more than {max_bytes} bytes)")
    except OSError as e:
        raise Unreadable(_os_reason(e)) from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def decode_source(data: bytes) -> str:
    """UTF-8 text (BOM dropped); Unreadable for NUL bytes or invalid UTF-8."""
    if b"\0" in data[:8192]:
        raise Unreadable("binary file (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not valid UTF-8 (byte {e.start})") from None


def read_text(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; Unreadable otherwise."""
    return decode_source(read_bytes(path, max_bytes))


def walk_files(
    root: str | os.PathLike[str],
    on_skip: Callable[[str, str], None],
    keep_dir: Callable[[Path], bool] = lambda d: True,
) -> Iterator[Path]:
    """Every non-directory entry under ``root`` (sorted, depth first, symlinked directories
    not followed). A directory that cannot be listed is reported as ``on_skip(path, reason)``
    and the walk goes on; ``keep_dir(d)`` False prunes ``d``."""
    stack = [Path(root)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            on_skip(str(d), _os_reason(e))
            continue
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                sub = Path(e.path)
                try:
                    if keep_dir(sub):
                        subdirs.append(sub)
                except OSError as err:
                    on_skip(e.path, _os_reason(err))
            else:
                yield Path(e.path)
        stack.extend(reversed(subdirs))
