"""assistant.files: the one safe reader (regular files only, capped, never blocking)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from assistant import files
from assistant.files import Unreadable, read_bytes, read_text, walk_files


@pytest.fixture(autouse=True)
def _no_hang():
    """A reader that blocks on a FIFO fails the test instead of hanging the suite."""

    def boom(*_):
        raise TimeoutError("the reader blocked")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_regular_file_bom_and_cap(tmp_path):
    (tmp_path / "a.py").write_bytes(b"\xef\xbb\xbfx = 1\n")
    assert read_text(tmp_path / "a.py") == "x = 1\n"
    (tmp_path / "big.py").write_text("x" * 101)
    with pytest.raises(Unreadable, match=r"too large \(101 bytes; the limit is 100\)"):
        read_bytes(tmp_path / "big.py", max_bytes=100)
    assert len(read_bytes(tmp_path / "big.py", max_bytes=101)) == 101
    (tmp_path / "bin.py").write_bytes(b"ab\0cd")
    with pytest.raises(Unreadable, match="binary file"):
        read_text(tmp_path / "bin.py")
    (tmp_path / "latin.py").write_bytes(b"caf\xe9\n")
    with pytest.raises(Unreadable, match=r"not valid UTF-8 \(byte 3\)"):
        read_text(tmp_path / "latin.py")


def test_special_files_get_one_line(tmp_path):
    os.mkfifo(tmp_path / "fifo.py")
    (tmp_path / "zero.py").symlink_to("/dev/zero")
    (tmp_path / "dangling.py").symlink_to(tmp_path / "gone.py")
    (tmp_path / "d").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.py"))
    try:
        cases = {
            "fifo.py": "not a regular file (a named pipe)",
            "zero.py": "not a regular file (a character device, via a symlink to /dev/zero)",
            "dangling.py": "broken symbolic link",
            "d": "is a directory",
            "s.py": "not a regular file (a socket)",
            "missing.py": "no such file",
        }
        for name, reason in cases.items():
            with pytest.raises(Unreadable) as e:
                read_text(tmp_path / name)
            assert str(e.value).startswith(reason) and "\n" not in str(e.value), (name, str(e.value))
        with pytest.raises(Unreadable, match="character device"):
            read_text("/dev/zero")
    finally:
        sock.close()


def test_file_swapped_after_the_check_is_rechecked(tmp_path, monkeypatch):
    """What is opened is checked again (fstat): a FIFO put in place after stat() is refused."""
    os.mkfifo(tmp_path / "fifo.py")
    (tmp_path / "ok.py").write_text("x = 1\n")
    real_stat = os.stat
    monkeypatch.setattr(files.os, "stat", lambda p, *a, **k: real_stat(str(tmp_path / "ok.py")))
    with pytest.raises(Unreadable, match="named pipe"):
        read_text(tmp_path / "fifo.py")


def test_unreadable_file_and_directory(tmp_path, monkeypatch):
    (tmp_path / "secret.py").write_text("x = 1\n")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "in.py").write_text("y = 2\n")
    (tmp_path / "z.py").write_text("z = 3\n")
    locked, secret = tmp_path / "locked", tmp_path / "secret.py"
    if os.geteuid() == 0:  # root reads everything: give the reader what a user gets
        real_open, real_scandir = os.open, os.scandir
        monkeypatch.setattr(files.os, "open", lambda p, *a, **k: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")) if Path(p) == secret else real_open(p, *a, **k))
        monkeypatch.setattr(files.os, "scandir", lambda p: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied")) if Path(p) == locked else real_scandir(p))
    secret.chmod(0)
    locked.chmod(0)
    try:
        with pytest.raises(Unreadable, match="^permission denied$"):
            read_text(secret)
        skipped = []
        found = [p.name for p in walk_files(tmp_path, lambda p, why: skipped.append((Path(p).name, why)))]
    finally:
        locked.chmod(0o755)
        secret.chmod(0o644)
    assert skipped == [("locked", "permission denied")]
    assert found == ["secret.py", "z.py"]  # the walk went on past the locked directory
