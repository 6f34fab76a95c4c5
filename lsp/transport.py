"""A robust JSON-RPC reader for the language server on stdio.

pygls reads ``Content-Length: N`` framed messages trusting every byte. One message with a
wrong length leaves it reading the next message as the body (or waiting for bytes that never
come), ``Content-Length: 1000000000000`` asks for that much memory, and bodies that are not
JSON-RPC objects get no answer. This reader:

* finds a header wherever it starts (case-insensitive, ``\\n`` or ``\\r\\n``), skipping garbage;
* refuses a ``Content-Length`` above ``MAX_BODY`` (answered with an error, framing resynced);
* resynchronises when a body is cut short or runs into the next message's header (a real
  CRLF followed by ``Content-Length:`` cannot be inside JSON), answering ``-32700``;
* answers a body that is not an object, or a request without ``"jsonrpc": "2.0"``, with
  ``-32600``; a request before ``initialize`` with ``-32002``; a request after ``shutdown``
  with ``-32600`` (only ``exit`` is expected then);
* makes the process exit 0 after ``shutdown`` + ``exit`` and 1 otherwise (LSP's rule).

Everything else goes to pygls's protocol unchanged (``protocol.handle_message``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import threading
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024  # a document larger than this is not something to complete
_HEADER = re.compile(rb"content-length[ \t]*:[ \t]*(\d+)[ \t]*\r?\n", re.I)
# a whole header line (ending in a real newline) cannot be inside a JSON body: raw newlines only
# appear between JSON tokens, and "Content-Length: 5" is no JSON token sequence
_NEXT = re.compile(rb"content-length[ \t]*:[ \t]*\d+[ \t]*\r?\n", re.I)

PARSE_ERROR, INVALID_REQUEST, SERVER_NOT_INITIALIZED = -32700, -32600, -32002


class Framer:
    """Bytes in, ``(body | None, error | None)`` out: the framing state machine, no I/O."""

    def __init__(self, max_body: int = MAX_BODY):
        self.buf = bytearray()
        self.max_body = max_body
        self.length: int | None = None  # of the body being read

    def feed(self, data: bytes) -> None:
        self.buf += data

    def messages(self) -> list[tuple[bytes | None, str | None]]:
        out: list[tuple[bytes | None, str | None]] = []
        while True:
            if self.length is None:
                m = _HEADER.search(self.buf)
                if m is None:
                    # keep a possible partial header at the end; drop garbage before it
                    cut = self.buf.lower().rfind(b"content-length")
                    if cut > 0:
                        del self.buf[:cut]
                    elif cut < 0 and len(self.buf) > 64:
                        del self.buf[:-64]
                    return out
                if m.start() > 0 and self.buf[:m.start()].strip():
                    log.warning("skipped %d bytes that were not a message header", m.start())
                # the header block ends at the first empty line after Content-Length
                end = re.compile(rb"\r?\n\r?\n").search(self.buf, m.start())
                blank = re.compile(rb"\r?\n").match(self.buf, m.end())
                if blank is not None:
                    body_at = blank.end()
                elif end is not None:
                    body_at = end.end()
                else:
                    return out  # the rest of the header has not arrived
                n = int(m.group(1))
                del self.buf[:body_at]
                if n > self.max_body:
                    out.append((None, f"Content-Length {n} is over the limit of {self.max_body} bytes"))
                    continue  # its body (if any comes) is skipped as garbage while looking for a header
                self.length = n
            nxt = _NEXT.search(self.buf, 0, self.length + 2)
            if nxt is not None and nxt.start() < self.length:  # the next message starts inside this body
                del self.buf[:nxt.start()]
                self.length = None
                out.append((None, "message body cut short by the next message (wrong Content-Length)"))
                continue
            if len(self.buf) < self.length:
                return out
            body = bytes(self.buf[:self.length])
            del self.buf[:self.length]
            self.length = None
            out.append((body, None))


class Gate:
    """What JSON-RPC and LSP allow before ``initialize`` and after ``shutdown``."""

    def __init__(self) -> None:
        self.initialized = False
        self.shutdown = False
        self.exited = False

    def check(self, msg: Any) -> tuple[Any, int, str] | None:
        """(id, code, message) to answer instead of handling ``msg``; None to handle it."""
        if not isinstance(msg, dict):
            return None, INVALID_REQUEST, "a JSON-RPC message must be an object"
        method = msg.get("method")
        msg_id = msg.get("id")
        is_request = "id" in msg and method is not None
        if msg.get("jsonrpc") != "2.0":
            return (msg_id if is_request else None), INVALID_REQUEST, 'missing "jsonrpc": "2.0"'
        if method is None:
            return None  # a response to a request of ours
        if not isinstance(method, str) or (is_request and (isinstance(msg_id, bool)
                                                             or not isinstance(msg_id, int | str))):
            return (msg_id if isinstance(msg_id, int | str) and not isinstance(msg_id, bool) else None,
                    INVALID_REQUEST, "bad method or id")
        if method == "exit":
            self.exited = True
            return None
        if self.shutdown:
            return (msg_id, INVALID_REQUEST, "the server is shutting down: only exit is expected") if is_request \
                else ("drop", 0, "")
        if not self.initialized:
            if method == "initialize" and is_request:
                self.initialized = True
                return None
            return (msg_id, SERVER_NOT_INITIALIZED, "the server is not initialized yet") if is_request \
                else ("drop", 0, "")
        if method == "shutdown" and is_request:
            self.shutdown = True
        return None


def _error(msg_id: Any, code: int, message: str) -> bytes:
    body = json.dumps({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}).encode()
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


async def serve(protocol: Any, stdin: BinaryIO, write: Any, stop: threading.Event, pool: Any,
                gate: Gate | None = None) -> Gate:
    """Read ``stdin`` until EOF or ``exit``; hand messages to pygls's ``protocol``."""
    loop = asyncio.get_running_loop()
    framer, gate = Framer(), gate or Gate()
    read = getattr(stdin, "read1", None) or stdin.read
    while not stop.is_set() and not gate.exited:
        data = await loop.run_in_executor(pool, read, 65536)
        if not data:
            break
        framer.feed(data)
        for body, problem in framer.messages():
            if body is None:
                log.warning("%s", problem)
                write(_error(None, PARSE_ERROR if "cut short" in (problem or "") else INVALID_REQUEST,
                             problem or "bad message"))
                continue
            try:
                msg = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                write(_error(None, PARSE_ERROR, f"not JSON: {e}"))
                continue
            verdict = gate.check(msg)
            if verdict is not None:
                if verdict[0] != "drop":
                    write(_error(*verdict))
                continue
            try:
                protocol.handle_message(json.loads(body, object_hook=protocol.structure_message))
            except SystemExit:
                raise
            except Exception:  # noqa: BLE001 - one bad message never stops the server
                log.exception("unable to handle a message")
            if gate.exited:
                break
    return gate


class _Writer:
    """One lock for every write to the client (pygls's and this module's error answers)."""

    def __init__(self, stdout: BinaryIO):
        self.out, self.lock = stdout, threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.out.write(data)
            self.out.flush()

    def close(self) -> None:
        with self.lock:
            self.out.close()


def start_io(server: Any, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Run ``server`` (a pygls LanguageServer) on stdio with the robust reader; the exit status:
    0 after ``shutdown`` then ``exit``, 1 otherwise (also when the client just goes away)."""
    writer = _Writer(stdout)
    server.protocol.set_writer(writer)
    server._stop_event = stop = threading.Event()
    gate = Gate()
    try:
        asyncio.run(_main(server, stdin, writer.write, stop, gate))
    except BrokenPipeError:
        log.error("the connection to the client is lost")
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        try:
            server.shutdown()
        except Exception:  # noqa: BLE001
            pass
    return 0 if gate.shutdown and gate.exited else 1


async def _main(server: Any, stdin: BinaryIO, write: Any, stop: threading.Event, gate: Gate) -> None:
    await serve(server.protocol, stdin, write, stop, server.thread_pool, gate)
    await asyncio.sleep(0)  # pygls answers `exit` by closing the writer and exiting in a callback


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `moecoder lsp`")
