"""Run untrusted Python (model-written code, benchmark tests) in a subprocess sandbox.

Each run gets a fresh temporary directory: ``ROOT/work`` is the child's working directory and
the only place it may write; ``ROOT`` also holds the bootstrap script and the captured output.
The child is ``python -I -B`` (isolated: no user site, no ``PYTHON*`` variables, no script
directory on ``sys.path``; no bytecode writes) in a new session, with a minimal environment and:

* resource limits set in ``preexec_fn``: CPU seconds, address space, file size, open files and
  (when not root) the number of processes, so a fork bomb cannot take the machine;
* a wall-clock timeout after which the whole process group is killed (SIGKILL);
* an audit hook (:func:`sys.addaudithook`, installed by the bootstrap before the untrusted code
  runs) that refuses ``open`` for writing and ``os.*``/``shutil.*`` mutations outside ``work``,
  and refuses starting processes, sockets, ``ctypes`` and raising resource limits.

This stops accidents and the usual ways benchmark code goes wrong (infinite loops, huge
allocations, stray files); it is not a boundary against a determined attacker (audit hooks can
be defeated from inside the interpreter). Run truly hostile code in a container or VM.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_BOOT = r"""
import os, sys

def _install(work):
    work = os.path.realpath(work)
    prefix = work + os.sep
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    realpath, fsdecode, getpid = os.path.realpath, os.fsdecode, os.getpid
    PATH_EVENTS = {
        "os.remove": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.rmdir": (0,), "os.chmod": (0,),
        "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
        "os.chflags": (0,), "os.lchflags": (0,), "os.lchmod": (0,), "os.lchown": (0,), "os.mkfifo": (0,),
        "os.mknod": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,),
        "shutil.move": (0, 1), "shutil.copyfile": (1,), "shutil.copymode": (1,), "shutil.copystat": (1,),
        "shutil.copytree": (1,), "shutil.chown": (0,), "shutil.unpack_archive": (1,),
        "shutil.make_archive": (0,),
    }
    DENY = {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "pty.spawn", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "resource.setrlimit", "resource.prlimit", "sys.remote_exec", "os.startfile", "webbrowser.open",
    }

    def inside(p):
        if p is None or isinstance(p, int):
            return True  # an already-open descriptor
        try:
            p = fsdecode(p)
        except TypeError:
            return False
        r = realpath(p)
        return r == work or r.startswith(prefix) or r == "/dev/null"

    def deny(msg):
        raise PermissionError("sandbox: " + msg)

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing and not inside(path):
                deny("write outside the sandbox directory: " + str(path))
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                if i < len(args) and not inside(args[i]):
                    deny(event + " outside the sandbox directory: " + str(args[i]))
        elif event == "sqlite3.connect":
            db = args[0] if args else None
            if db not in (":memory:", b":memory:", "", b"") and not inside(db):
                deny("database outside the sandbox directory: " + str(db))
        elif event in DENY or event.startswith("ctypes."):
            deny(event + " is not allowed")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if args and args[0] != getpid():
                deny(event + " is not allowed")

    sys.addaudithook(hook)


def _main():
    work, kind, target, *argv = sys.argv[1:]
    _install(work)
    os.chdir(work)
    sys.path.insert(0, work)
    import runpy
    sys.argv = [target, *argv]
    if kind == "module":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")


_main()
"""


@dataclass
class SandboxResult:
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    duration: float
    files: dict[str, str] = field(default_factory=dict)  # the ``collect``ed files (text, size-limited)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _user_tasks() -> int:
    """Processes + threads of this user now (what RLIMIT_NPROC counts)."""
    uid, n = os.getuid(), 0
    try:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid == uid:
                        n += len(os.listdir(f"/proc/{entry.name}/task"))
                except OSError:
                    continue
    except OSError:
        return -1
    return n


def _limits(cpu_seconds: int, memory_mb: int | None, max_file_mb: int, nproc: int | None):
    def apply() -> None:
        import resource

        def lim(which: int, value: int) -> None:
            soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))

        lim(resource.RLIMIT_CPU, cpu_seconds)
        if memory_mb:
            lim(resource.RLIMIT_AS, memory_mb * 1024 * 1024)
        lim(resource.RLIMIT_FSIZE, max_file_mb * 1024 * 1024)
        lim(resource.RLIMIT_NOFILE, 256)
        lim(resource.RLIMIT_CORE, 0)
        if nproc is not None:
            lim(resource.RLIMIT_NPROC, nproc)

    return apply


def _write_files(work: Path, files: Mapping[str, str | bytes | os.PathLike] | None) -> None:
    for name, content in (files or {}).items():
        dest = (work / name).resolve()
        if not str(dest).startswith(str(work.resolve()) + os.sep):
            raise ValueError(f"sandbox file {name!r} escapes the sandbox directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            dest.write_bytes(content)
        elif isinstance(content, str):
            dest.write_text(content, encoding="utf-8")
        else:
            src = Path(content)
            if src.is_dir():
                shutil.copytree(src, dest, dirs_exist_ok=True)
            else:
                shutil.copyfile(src, dest)


def _read(path: Path, limit: int) -> str:
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[... output truncated]" if len(data) > limit else "")


def run(
    kind: str,
    target: str,
    args: Sequence[str] = (),
    *,
    files: Mapping[str, str | bytes | os.PathLike] | None = None,
    timeout: float = 10.0,
    memory_mb: int | None = 2048,
    cpu_seconds: int | None = None,
    max_file_mb: int = 16,
    max_output: int = 64_000,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    collect: Sequence[str] = (),
    max_collect: int = 8_000_000,
) -> SandboxResult:
    """Run ``target`` (``kind`` "path": a file relative to the work dir; "module": ``python -m``).

    ``collect`` names files (relative to the work dir) to read back after the run, whatever
    its outcome (a killed run keeps what it wrote): :attr:`SandboxResult.files`."""
    if kind not in ("path", "module"):
        raise ValueError(f"unknown sandbox target kind {kind!r}")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    root = Path(tempfile.mkdtemp(prefix="moecoder-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        _write_files(work, files)
        boot = root / "boot.py"
        boot.write_text(_BOOT, encoding="utf-8")
        base_env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        base_env.update(env or {})
        cpu = cpu_seconds if cpu_seconds is not None else math.ceil(timeout) + 1
        tasks = _user_tasks() if os.getuid() != 0 else -1
        nproc = tasks + 64 if tasks > 0 else None
        cmd = [python or sys.executable, "-I", "-B", str(boot), str(work), kind, target, *args]
        t0 = time.monotonic()
        timed_out = False
        with (root / "stdout").open("wb") as out, (root / "stderr").open("wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=work,
                env=base_env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_limits(cpu, memory_mb, max_file_mb, nproc),
                close_fds=True,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, stray children included
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        got: dict[str, str] = {}
        for name in collect:
            f = (work / name).resolve()
            if str(f).startswith(str(work.resolve()) + os.sep) and f.is_file() and not f.is_symlink():
                got[name] = _read(f, max_collect)
        return SandboxResult(
            returncode=proc.returncode,
            stdout=_read(root / "stdout", max_output),
            stderr=_read(root / "stderr", max_output),
            timed_out=timed_out,
            duration=time.monotonic() - t0,
            files=got,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_code(
    code: str, *, files: Mapping[str, str | bytes | os.PathLike] | None = None, **kw
) -> SandboxResult:
    """Run a Python source string as ``main.py`` in a fresh sandbox; other ``files`` sit beside it."""
    return run("path", "main.py", files={**(files or {}), "main.py": code}, **kw)


def run_pytest(
    files: Mapping[str, str | bytes | os.PathLike], test_args: Sequence[str] = (), **kw
) -> SandboxResult:
    """Run pytest (quiet, no cache, no plugins autoloaded) over ``files`` in a fresh sandbox."""
    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    args = ["-q", "-x", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *test_args]
    return run("module", "pytest", args, files=files, env=env, **kw)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - manual use
    """``python -m assistant.sandbox FILE [--timeout S]``: run a file in the sandbox, print the result."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m assistant.sandbox")
    p.add_argument("file")
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    try:
        code = Path(a.file).read_text(encoding="utf-8")
    except OSError as e:
        print(f"sandbox: error: {e}", file=sys.stderr)
        return 2
    r = run_code(code, timeout=a.timeout)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    print(
        json.dumps({"returncode": r.returncode, "timed_out": r.timed_out, "duration": round(r.duration, 3)})
    )
    return 0 if r.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
