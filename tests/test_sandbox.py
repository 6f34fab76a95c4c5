"""The subprocess sandbox (assistant/sandbox.py) that runs model-written code and benchmark tests."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from assistant.sandbox import run_code, run_pytest


def test_runs_code_isolated_in_its_own_directory():
    r = run_code("import os, sys\nprint(sys.flags.isolated, os.getcwd().endswith('work'))\nprint(open('data.txt').read())",
                 files={"data.txt": "given"})  # fmt: skip
    assert r.ok, r.stderr
    assert r.stdout.split("\n")[:2] == ["1 True", "given"]


def test_kills_an_infinite_loop_within_the_timeout():
    r = run_code("while True:\n    pass\n", timeout=1.5)
    assert r.timed_out and not r.ok
    assert r.returncode < 0  # killed by a signal
    assert r.duration < 30  # generous: without the kill this never returns


def test_kills_a_sleeping_process_too():
    r = run_code("import time\ntime.sleep(600)\n", timeout=1.0)
    assert r.timed_out and r.returncode < 0


@pytest.mark.parametrize(
    "code",
    [
        "open('/tmp/../{name}', 'w').write('x')",
        "open('../{name}', 'a')",
        "import os\nos.open('/tmp/{name}', os.O_WRONLY | os.O_CREAT)",
        "from pathlib import Path\nPath('/tmp/{name}').write_text('x')",
        "import os\nos.mkdir('/tmp/{name}')",
        "import os\nos.symlink('/tmp', 'link')\nopen('link/{name}', 'w')",
        "import shutil\nshutil.copyfile('main.py', '/tmp/{name}')",
        "import sqlite3\nsqlite3.connect('/tmp/{name}').execute('create table t (x)')",
        "import os\nos.chdir('/tmp')\nopen('{name}', 'w')",
    ],
)
def test_cannot_write_outside_its_directory(code):
    name = f"moecoder-sbx-{uuid.uuid4().hex}"
    r = run_code(code.format(name=name))
    assert r.returncode != 0
    assert "PermissionError: sandbox:" in r.stderr
    assert not (Path("/tmp") / name).exists()


def test_can_write_inside_and_read_outside():
    r = run_code("import sqlite3\nsqlite3.connect(':memory:').execute('select 1')\nsqlite3.connect('db.sqlite')\n"
                 "open('out.txt', 'w').write('ok')\nimport os\nos.mkdir('d')\nos.remove('out.txt')\n"
                 "print(len(open(os.__file__).read()) > 0)")  # fmt: skip
    assert r.ok, r.stderr
    assert r.stdout.strip() == "True"


@pytest.mark.parametrize(
    "code",
    [
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import socket\nsocket.socket().connect(('127.0.0.1', 9))",
        "import ctypes\nctypes.CDLL(None)",
    ],
)
def test_no_processes_sockets_or_ctypes(code):
    r = run_code(code)
    assert r.returncode != 0 and "PermissionError: sandbox:" in r.stderr


def test_memory_limit_and_output_cap():
    r = run_code("x = bytearray(8 * 1024**3)", memory_mb=512)
    assert r.returncode != 0 and "MemoryError" in r.stderr
    r = run_code("print('y' * 100_000)", max_output=1000)
    assert r.ok and len(r.stdout) < 1100 and r.stdout.endswith("[... output truncated]")


def test_pytest_in_the_sandbox_reports_pass_and_fail():
    ok = run_pytest({"sol.py": "def add(a, b):\n    return a + b\n",
                     "test_sol.py": "from sol import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"})  # fmt: skip
    assert ok.ok, ok.stdout + ok.stderr
    bad = run_pytest({"sol.py": "def add(a, b):\n    return a - b\n",
                      "test_sol.py": "from sol import add\n\ndef test_add():\n    assert add(2, 3) == 5\n"})  # fmt: skip
    assert bad.returncode == 1 and "1 failed" in bad.stdout


def test_leaves_nothing_behind_and_rejects_escaping_file_names(tmp_path):
    before = {p for p in os.listdir(os.environ.get("TMPDIR", "/tmp")) if p.startswith("moecoder-sandbox-")}
    run_code("open('x', 'w').write('1')")
    after = {p for p in os.listdir(os.environ.get("TMPDIR", "/tmp")) if p.startswith("moecoder-sandbox-")}
    assert after <= before
    with pytest.raises(ValueError, match="escapes"):
        run_code("pass", files={"../evil.py": "x"})
