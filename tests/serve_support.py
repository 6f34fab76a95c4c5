"""A moecoder server on a free loopback port in a thread (tests of serve and --server URL)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_reasoning(service) -> dict:
    """Make the tiny random model write reasoning, then an answer: after <|think|> it writes A,
    after A <|/think|>, after that B, after B <eos> (a forward hook on the logits)."""

    tok = service.tokenizer
    a, b = tok.encode("alpha")[0], tok.encode("beta")[0]
    nxt = {tok.special_id("think"): a, a: tok.special_id("think_end"), tok.special_id("think_end"): b, b: tok.eos_id}

    def hook(_module, inputs, logits):
        last = inputs[0][:, -1].tolist()
        for row, t in enumerate(last):
            if t in nxt:
                logits[row, -1] = -1e4
                logits[row, -1, nxt[t]] = 1e4
        return logits

    service.model.register_forward_hook(hook)
    return {"reasoning": tok.decode([a]), "answer": tok.decode([b])}


@contextmanager
def running(service, api_key: str | None = None):
    import uvicorn

    from serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if time.monotonic() - t0 > 30 or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
