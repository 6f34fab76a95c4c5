"""Fuzzing the server process with random JSON-RPC traffic (hypothesis).

Malformed JSON, non-object JSON, unknown methods, known methods with wrong params,
requests for unopened documents, invalid positions and random edits go to one server
process over stdio (framing kept valid: a byte stream with a wrong Content-Length cannot
be resynchronised by any server). After every example the process must be alive and a
normal completion on a document the fuzzer never touches must still answer correctly.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.lsp_support import SERVER_CMD, server_env

PING_URI = "file:///fuzz/ping.py"
PING_TEXT = "value = compute(1)\n"
FUZZ_URIS = ["file:///fuzz/a.py", "file:///fuzz/b.txt", "file:///fuzz/never_opened.py", "not a uri", ""]
KNOWN = [
    "textDocument/completion", "textDocument/inlineCompletion", "textDocument/codeAction",
    "codeAction/resolve", "textDocument/diagnostic", "textDocument/hover", "textDocument/didOpen",
    "textDocument/didChange", "textDocument/didSave", "textDocument/didClose",
    "workspace/didChangeConfiguration", "workspace/executeCommand", "$/cancelRequest", "$/setTrace",
]


class RawServer:
    """The server process and a minimal framed JSON-RPC channel to it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(SERVER_CMD, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=server_env())
        self.responses: dict[object, queue.Queue] = {}
        self.shown: list[str] = []  # window/showMessage texts
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.next_id = 0

    def _read(self) -> None:
        out = self.proc.stdout
        while True:
            length = None
            while True:
                line = out.readline()
                if not line:
                    return
                if line in (b"\r\n", b"\n"):
                    break
                name, _, value = line.decode("ascii", "replace").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length is None:
                continue
            msg = json.loads(out.read(length))
            if "id" in msg and "method" not in msg:
                with self.lock:
                    q = self.responses.setdefault(msg["id"], queue.Queue())
                q.put(msg)
            elif "id" in msg and "method" in msg:  # a request from the server: answer it
                self.send({"jsonrpc": "2.0", "id": msg["id"], "result": None})
            elif msg.get("method") == "window/showMessage":
                self.shown.append(msg["params"]["message"])

    def send_bytes(self, body: bytes, junk_header: bool = False) -> None:
        head = (b"X-Junk: yes\r\n" if junk_header else b"") + b"Content-Length: %d\r\n\r\n" % len(body)
        self.proc.stdin.write(head + body)
        self.proc.stdin.flush()

    def send(self, msg: dict) -> None:
        self.send_bytes(json.dumps(msg).encode("utf-8"))

    def request(self, method: str, params: object, timeout: float = 20.0) -> dict:
        self.next_id += 1
        msg_id = f"ping-{self.next_id}"
        with self.lock:
            q = self.responses.setdefault(msg_id, queue.Queue())
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
        return q.get(timeout=timeout)

    def notify(self, method: str, params: object) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def close(self) -> int:
        try:
            self.request("shutdown", None, timeout=10)
            self.notify("exit", None)
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                      st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=12), kids, max_size=4)), max_leaves=12)
big_int = st.one_of(st.integers(-5, 5), st.integers(-2**31, 2**31), st.just(2**31 - 1))
position = st.fixed_dictionaries({"line": big_int, "character": big_int})
rng = st.fixed_dictionaries({"start": position, "end": position})
doc_id = st.fixed_dictionaries({"uri": st.sampled_from(FUZZ_URIS)})
msg_id = st.one_of(st.integers(0, 10**6), st.text(max_size=8), st.none(), st.booleans(), st.floats(allow_nan=False))


def _request(method, params):
    return st.builds(lambda i, p: {"jsonrpc": "2.0", "id": i, "method": method, "params": p}, msg_id, params)


def _notification(method, params):
    return st.builds(lambda p: {"jsonrpc": "2.0", "method": method, "params": p}, params)


positioned = st.fixed_dictionaries({"textDocument": doc_id, "position": position})
messages = st.one_of(
    # bytes that are not JSON, and JSON that is not a JSON-RPC object
    st.binary(max_size=60).map(lambda b: b"{" + b),
    st.text(max_size=40).map(lambda t: ("{\"jsonrpc\": \"2.0\", " + t).encode("utf-8")),
    json_value.map(lambda v: json.dumps(v).encode()),
    # unknown methods and known methods with random params
    st.builds(lambda m, i, p: json.dumps({"jsonrpc": "2.0", "id": i, "method": m, "params": p}).encode(),
              st.text(max_size=20), msg_id, json_value),
    st.builds(lambda m, i, p: json.dumps({"jsonrpc": "2.0", "id": i, "method": m, "params": p}).encode(),
              st.sampled_from(KNOWN), msg_id, json_value),
    st.builds(lambda m, p: json.dumps({"jsonrpc": "2.0", "method": m, "params": p}).encode(),
              st.sampled_from(KNOWN), json_value),
    # well-formed requests for unopened documents / invalid positions
    _request("textDocument/completion", positioned).map(lambda m: json.dumps(m).encode()),
    _request("textDocument/inlineCompletion", positioned.map(
        lambda p: {**p, "context": {"triggerKind": 1}})).map(lambda m: json.dumps(m).encode()),
    _request("textDocument/hover", positioned).map(lambda m: json.dumps(m).encode()),
    _request("textDocument/codeAction", st.fixed_dictionaries(
        {"textDocument": doc_id, "range": rng, "context": st.just({"diagnostics": []})})).map(
        lambda m: json.dumps(m).encode()),
    _request("textDocument/diagnostic", st.fixed_dictionaries({"textDocument": doc_id})).map(
        lambda m: json.dumps(m).encode()),
    # document traffic with random versions and ranges
    _notification("textDocument/didOpen", st.fixed_dictionaries({"textDocument": st.fixed_dictionaries({
        "uri": st.sampled_from(FUZZ_URIS), "languageId": st.sampled_from(["python", "plaintext", ""]),
        "version": big_int, "text": st.text(max_size=200)})})).map(lambda m: json.dumps(m).encode()),
    _notification("textDocument/didChange", st.fixed_dictionaries({
        "textDocument": st.fixed_dictionaries({"uri": st.sampled_from(FUZZ_URIS), "version": big_int}),
        "contentChanges": st.lists(st.one_of(
            st.fixed_dictionaries({"range": rng, "text": st.text(max_size=30)}),
            st.fixed_dictionaries({"text": st.text(max_size=60)})), max_size=3)})).map(
        lambda m: json.dumps(m).encode()),
    _notification("textDocument/didClose", st.fixed_dictionaries({"textDocument": doc_id})).map(
        lambda m: json.dumps(m).encode()),
)


def _request_id(body: bytes) -> list:
    try:
        msg = json.loads(body)
    except ValueError:
        return []
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or not isinstance(msg.get("method"), str):
        return []
    i = msg.get("id")
    return [i] if isinstance(i, (int, str)) and not isinstance(i, bool) else []


def test_random_jsonrpc_traffic_never_breaks_the_server():
    srv = RawServer()
    try:
        init = srv.request("initialize", {"processId": None, "rootUri": None, "capabilities": {
            "textDocument": {"diagnostic": {}, "inlineCompletion": {}}}}, timeout=60)
        assert "capabilities" in init["result"]
        srv.notify("initialized", {})
        srv.notify("textDocument/didOpen", {"textDocument": {
            "uri": PING_URI, "languageId": "python", "version": 1, "text": PING_TEXT}})

        def ping() -> None:
            assert srv.proc.poll() is None, "the server died"
            resp = srv.request("textDocument/completion", {
                "textDocument": {"uri": PING_URI}, "position": {"line": 0, "character": 13}})
            items = resp["result"]["items"]
            assert [i["textEdit"]["newText"] for i in items] == ["compudone_L0_C13"]

        ping()
        # bytes that are not JSON get a JSON-RPC parse error with a null id
        srv.send_bytes(b'{"jsonrpc": "2.0", "id": 1, "method": ')
        resp = srv.responses.setdefault(None, queue.Queue()).get(timeout=20)
        assert resp["error"]["code"] == -32700
        sent: list[int] = []

        @settings(max_examples=60, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.lists(st.tuples(messages, st.booleans()), min_size=1, max_size=5))
        def fuzz(batch):
            sent.append(len(batch))
            expected = []
            for body, junk in batch:
                srv.send_bytes(body, junk_header=junk)
                expected += _request_id(body)
            ping()
            # every well-formed request got a response (a result or an error), none hangs
            for i in expected:
                with srv.lock:
                    q = srv.responses.setdefault(i, queue.Queue())
                resp = q.get(timeout=20)
                assert "result" in resp or "error" in resp

        fuzz()
        assert len(sent) >= 50 and sum(sent) >= 100  # the examples really ran
        # no handler of ours crashed on the junk (those are reported as internal errors)
        assert not [m for m in srv.shown if "internal error" in m], srv.shown
        assert srv.close() == 0
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
