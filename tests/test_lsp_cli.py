"""`moecoder lsp` command line: bad arguments exit 2 with one line; --tcp serves over TCP."""

from __future__ import annotations

import json
import socket
import subprocess
import time

from tests.lsp_support import REAL_SERVER_CMD, SERVER_CMD, server_env


def _run(*args: str, config=None) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVER_CMD, *args], capture_output=True, text=True, timeout=60, env=server_env(config),
                          input="")


def test_bad_arguments_exit_2_with_one_line():
    for args, needle in [(["--tcp", "nonsense"], "HOST:PORT"), (["--tcp", "localhost:99999"], "HOST:PORT"),
                         (["--model", "/no/such/model/dir"], "model directory not found"),
                         (["--log-file", "/no/such/dir/lsp.log"], "cannot write the log file")]:
        proc = _run(*args)
        assert proc.returncode == 2, args
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_busy_tcp_port_exits_2_with_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = _run("--tcp", f"127.0.0.1:{s.getsockname()[1]}")
    assert proc.returncode == 2 and "cannot listen" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_bad_config_file_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[lsp]\ndevice = 3\n')
    proc = _run(config=cfg)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lsp.device" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def _frame(msg: dict) -> bytes:
    body = json.dumps(msg).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


def test_tcp_mode_answers_initialize():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*SERVER_CMD, "--tcp", f"127.0.0.1:{port}"], env=server_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "the TCP server did not start"
                time.sleep(0.1)
        with conn:
            conn.sendall(_frame({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                 "params": {"processId": None, "rootUri": None, "capabilities": {}}}))
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(head.split(b"Content-Length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += conn.recv(65536)
            reply = json.loads(body[:length])
        assert reply["id"] == 1 and reply["result"]["serverInfo"]["name"] == "moecoder"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_help_lists_the_options():
    proc = subprocess.run([*REAL_SERVER_CMD, "--help"], capture_output=True, text=True, timeout=60, env=server_env())
    assert proc.returncode == 0 and "--tcp" in proc.stdout and "--model" in proc.stdout


def test_initialize_is_answered_before_torch_or_the_model_loads(tmp_path):
    """The product's `moecoder lsp` answers initialize (and shutdown) without importing torch:
    the model loads in the background after `initialized`, so the editor is not kept waiting
    (the issue: torch imported before the first message was read, initialize after 2-8 s)."""
    import sys

    code = ("import atexit, sys; "
            "atexit.register(lambda: sys.__stderr__.write('\\nHEAVY %s\\n' % sorted("
            "m for m in ('torch', 'model.transformer', 'assistant.engine') if m in sys.modules))); "
            "from assistant.cli import main; sys.exit(main(['lsp', '--model', sys.argv[1]]))")
    model_dir = tmp_path / "model"  # never opened: the server must not even look yet
    model_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", code, str(model_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env())
    try:
        def reply() -> dict:
            length = None
            while True:
                line = proc.stdout.readline()
                assert line, proc.stderr.read().decode()
                if not line.strip():
                    return json.loads(proc.stdout.read(length))
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)

        proc.stdin.write(_frame({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                 "params": {"processId": None, "rootUri": None, "capabilities": {}}}))
        proc.stdin.flush()
        assert reply()["result"]["serverInfo"]["name"] == "moecoder"
        for msg in ({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}, {"jsonrpc": "2.0", "method": "exit"}):
            proc.stdin.write(_frame(msg))
            proc.stdin.flush()
        assert reply()["id"] == 2
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert "HEAVY []" in err.decode(), err.decode()
