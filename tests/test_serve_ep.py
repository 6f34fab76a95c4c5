"""moecoder serve with the experts sharded over 2 processes (gloo, CPU): it serves, and a rank
that dies ends the server with a one-line error instead of a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.serve_support import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _launch(model_dir, port: int, ep_timeout: float = 10.0) -> list[subprocess.Popen]:
    """Two ranks started by hand (no torchrun agent to clean up after them: the server must)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    cmd = [sys.executable, "-m", "assistant.cli", "serve", "--ep", "2", "--model", str(model_dir), "--port", str(port),
           "--ep-timeout", str(ep_timeout), "--threads", "1"]
    return [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for r in range(2)]


def _wait_up(url: str, procs, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the EP server did not come up")


def test_ep2_server_serves_and_a_dead_rank_ends_it(tiny_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = _launch(tiny_model_dir, port)
    try:
        _wait_up(url, procs)
        body = {"prompt": "def add(a, b):\n    return", "max_tokens": 6, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/health").json()["ep"] == 2
        procs[1].kill()  # rank 1 dies while the server is idle: the heartbeat finds out
        t0 = time.monotonic()
        rc = procs[0].wait(timeout=60)
        assert rc == 1
        assert time.monotonic() - t0 < 60
        err = procs[0].stderr.read()
        assert "moecoder serve: error: the expert-parallel group failed" in err, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
