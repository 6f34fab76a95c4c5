"""lsp.transport: the server on stdio survives and answers transport faults (a raw client)."""

from __future__ import annotations

import json
import subprocess

import pytest

from lsp.transport import Framer
from tests.lsp_support import SERVER_CMD, server_env


def frame(body: bytes, length: int | None = None) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body


def test_framer_resyncs_after_wrong_lengths_and_caps_bodies():
    f = Framer(max_body=100)
    f.feed(frame(b'{"a":1}') + frame(b'{"a":2}', length=3) + frame(b'{"b":2}') + frame(b"junk", length=10**12)
           + frame(b'{"c":3}') + frame(b'{"x":1}', length=50) + frame(b'{"d":4}'))
    got = f.messages()
    bodies = [b for b, _ in got if b is not None and b.startswith(b"{") and b.endswith(b"}")]
    assert bodies == [b'{"a":1}', b'{"b":2}', b'{"c":3}', b'{"d":4}']
    problems = [p for _, p in got if p]
    assert any("over the limit" in p for p in problems) and any("cut short" in p for p in problems)
    # a body that mentions a header in its text is not mistaken for one (no raw newline in JSON)
    f = Framer()
    f.feed(frame(b'{"text": "Content-Length: 5\\r\\n"}'))
    assert f.messages() == [(b'{"text": "Content-Length: 5\\r\\n"}', None)]
    # headers in pieces, lower case, LF only, an extra Content-Type header
    f = Framer()
    for piece in (b"content-len", b"gth: 7\nContent-Type: x\n", b"\n{\"e\"", b":5}"):
        f.feed(piece)
    assert f.messages() == [(b'{"e":5}', None)]


class Raw:
    def __init__(self):
        self.proc = subprocess.Popen(SERVER_CMD, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=server_env())

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def msg(self, obj) -> None:
        self.send(frame(json.dumps(obj).encode()))

    def read(self) -> dict:
        out = self.proc.stdout
        length = None
        while True:
            line = out.readline()
            assert line, "the server closed its output"
            if line.strip() == b"":
                if length is not None:
                    return json.loads(out.read(length))
                continue
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)

    def response(self, msg_id) -> dict:
        while True:
            m = self.read()
            if m.get("id") == msg_id and "method" not in m:
                return m
            if "id" in m and "method" in m:  # a request of the server's: answer it
                self.msg({"jsonrpc": "2.0", "id": m["id"], "result": None})

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def raw():
    r = Raw()
    yield r
    r.close()


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}, "processId": None}}


def test_transport_faults_are_answered_or_survived(raw):
    # before initialize: -32002 for a request
    raw.msg({"jsonrpc": "2.0", "id": 0, "method": "textDocument/hover",
             "params": {"textDocument": {"uri": "file:///a.py"}, "position": {"line": 0, "character": 0}}})
    assert raw.response(0)["error"]["code"] == -32002
    raw.msg(INIT)
    assert "capabilities" in raw.response(1)["result"]
    raw.msg({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    # a wrong Content-Length (too long) does not leave the server deaf
    body = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}).encode()
    raw.send(frame(b'{"jsonrpc": "2.0", "id": 99, "method": "x"}', length=500))
    # a huge one does not kill it
    raw.send(b"Content-Length: 1000000000000\r\n\r\n")
    # a body that is not an object, and a request without "jsonrpc"
    raw.send(frame(b"[1, 2, 3]"))
    raw.msg({"id": 3, "method": "textDocument/hover", "params": {}})
    errors = [raw.read() for _ in range(4)]
    codes = sorted(e["error"]["code"] for e in errors)
    assert codes == [-32700, -32600, -32600, -32600], errors
    assert any(e.get("id") == 3 for e in errors)
    # still alive and answering
    raw.send(frame(body))
    assert raw.response(2)["result"] is None
    # after shutdown: requests get an error, then exit -> status 0
    raw.msg({"jsonrpc": "2.0", "id": 4, "method": "textDocument/hover", "params": {}})
    assert raw.response(4)["error"]["code"] == -32600
    raw.msg({"jsonrpc": "2.0", "method": "exit"})
    assert raw.proc.wait(timeout=60) == 0


def test_exit_without_shutdown_exits_1(raw):
    raw.msg(INIT)
    raw.response(1)
    raw.msg({"jsonrpc": "2.0", "method": "exit"})
    assert raw.proc.wait(timeout=60) == 1


def test_lone_surrogate_in_a_document_is_not_an_internal_error(raw):
    from lsp.documents import Document

    doc = Document("file:///s.py", "x = '\ud800'\ny = 1\n")
    assert doc.text == "x = '\ufffd'\ny = 1\n"  # one UTF-16 unit for one: positions unchanged
    raw.msg(INIT)
    raw.response(1)
    raw.msg({"jsonrpc": "2.0", "method": "initialized", "params": {}})
    raw.msg({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
        "uri": "file:///s.py", "languageId": "python", "version": 1, "text": "x = '\ud800'\nval = comp"}}})
    raw.msg({"jsonrpc": "2.0", "id": 2, "method": "textDocument/completion", "params": {
        "textDocument": {"uri": "file:///s.py"}, "position": {"line": 1, "character": 10}}})
    r = raw.response(2)
    assert "error" not in r, r


def test_a_completion_cut_inside_a_character_drops_the_half():
    from assistant.tasks import postprocess_completion

    assert postprocess_completion("print('caf\ufffd", "x = ", "", False) == "print('caf"


async def test_cancel_while_waiting_for_progress_create_leaves_the_request_alone():
    """Typing cancels a hints run waiting for window/workDoneProgress/create: the request's
    future is not cancelled, so the client's late answer is no InvalidStateError."""
    import asyncio
    import concurrent.futures
    import types as pytypes

    from lsp.server import Progress

    pending = concurrent.futures.Future()

    class WDP:
        def create_async(self, token):
            return asyncio.wrap_future(pending)

        def begin(self, *a):
            pass

        def end(self, *a):
            pass

    server = pytypes.SimpleNamespace(client_has=lambda path, default=None: True, _progress_ids=iter(range(9)),
                                     work_done_progress=WDP())

    async def hints():
        async with Progress(server, "hints"):
            await asyncio.sleep(10)

    task = asyncio.ensure_future(hints())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pending.cancelled()
    pending.set_result(None)  # the client's late answer: accepted, no InvalidStateError
    await asyncio.sleep(0)
