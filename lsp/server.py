# Longer than 600 lines because it holds the protocol handlers and the server state they share; task
# rules live in assistant (diagnostics, context, tasks), transport robustness in lsp/ modules of its
# own.
"""The moecoder language server: pygls 2 on top of ``assistant`` (Engine + tasks).

Features (each can be switched off in the settings; hover is off by default):

- ``textDocument/completion`` and ``textDocument/inlineCompletion`` (advertised only to
  clients that declare inline completion support): fill-in-the-middle at the cursor.
  Multi-line only where the syntax calls for it (``Completion.multiline``, decided by
  ``assistant.tasks`` from the syntax at the cursor), otherwise the first line. A newer request of the same kind cancels the
  older one; a result computed for a document version that is no longer current is
  dropped (empty result).
- ``textDocument/codeAction`` + ``codeAction/resolve``: "Add docstring" for the
  function at the cursor (the model runs only on resolve) and "Apply fix" for a
  debugging hint.
- Diagnostics from the debug task, computed on save and after ~1 s of idle, never per
  keystroke: pull (``textDocument/diagnostic`` with result ids) when the client supports
  it and ``workspace/diagnostic/refresh`` (so it can be told to re-pull),
  ``textDocument/publishDiagnostics`` otherwise.
- ``textDocument/hover``: a short explanation, reasoning first (setting, off by default).
- ``$/progress`` for model loading, diagnostics, docstrings and hover; ``$/cancelRequest``
  cancels the engine's token; settings via ``initializationOptions`` and
  ``workspace/didChangeConfiguration``; incremental sync; UTF-8/16/32 positions.

Settings (camelCase, either top level or under a ``"moecoder"`` key)::

    {"modelPath": null, "device": "cpu", "maxTokens": 48, "maxLineTokens": 32, "maxTaskTokens": 256,
     "maxSeconds": 10.0,
     "contextTokens": 512, "relatedTokens": 0, "repositoryContext": true,
     "diagnosticsDelay": 1.0, "maxDiagnosticLines": 3000, "minConfidence": 0.5,
     "features": {"completion": true, "inlineCompletion": true, "codeActions": true,
                  "diagnostics": true, "hover": false}}

The model and device come from the config file (``assistant.config``, ``[lsp]`` table
overrides), then ``--model``/``--device``, then the editor's ``modelPath``/``device``.
The server talks to any :class:`assistant.protocols.Engine`; tests pass their scripted
engine to :func:`build_server` / :func:`main` (``tests/lsp_fake_server.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lsprotocol import types
from pygls.capabilities import ServerCapabilitiesBuilder, get_capability
from pygls.exceptions import (
    FeatureNotificationError,
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcParseError,
)
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol, lsp_method

from assistant import __version__, diagnostics, memory
from assistant.config import Settings as Config
from assistant.config import face_settings, load_settings
from assistant.protocols import CancelToken, Engine
from assistant.tasks import Hint, TaskRequest
from lsp.args import build_parser as _parser  # light: `moecoder lsp --help` imports only it
from lsp.documents import Document, normalize_encoding

log = logging.getLogger("moecoder.lsp")

PYTHON_IDS = {"python", "py", "python3"}
SOURCE = "moecoder"
DOCSTRING_KIND = types.CodeActionKind.RefactorRewrite
FIND_BUG_KIND = "moecoder.findBug"  # not a quick fix: it runs code, so only when asked for by name or unfiltered
FIND_BUG_COMMAND = "moecoder.findBug"
FIND_BUG_TITLE = "Find the bug (runs examples)"
MAX_RELATED = 2
# repositoryContext: completions never read the workspace themselves (-1: they use what was read);
# the server reads it into the memory (assistant/memory.py) while the editor is idle: after
# IDLE_READ_AFTER_S without a request or an edit, READ_SLICE_S at a time on the engine's thread; a
# request or an edit meanwhile stops the slice after the model's current window (a completion waits
# for one window at most: 1,024 tokens, ~0.3 s for the shipped model on 2 cores), and again every
# assistant.memory.RECHECK_S once all was read (edited files are read again)
REPO_READ_S = -1.0
IDLE_READ_AFTER_S = 2.0
READ_SLICE_S = 1.0
MAX_RELATED_CHARS = 8_000
_WORD_TAIL = re.compile(r"[A-Za-z0-9_]*$")


_SEVERITY = {"error": types.DiagnosticSeverity.Error, "warning": types.DiagnosticSeverity.Warning,
             "note": types.DiagnosticSeverity.Information}


class TaskFailed(Exception):
    """The engine reported an error event (one line)."""


# -- settings ------------------------------------------------------------------------------
@dataclass
class Settings:
    model_path: str | None = None
    device: str = "cpu"
    max_tokens: int = 48  # completion
    max_line_tokens: int = 32  # completion where code follows the cursor (surely one line)
    context_tokens: int = 512  # completion prompt cap, tokens (0 = the config file's completion_context_tokens)
    related_tokens: int = 0  # completion prompt: other open Python files (0 = none)
    # completion: the workspace's memory (a kNN-LM, assistant/memory.py), read through the model
    # while the editor is idle (textual's 2.7 MB takes 4 minutes on 2 cores; until then completions
    # use what was read). On by default: +5 points of exact match on held-out packages (model card)
    repository_context: bool = True
    max_task_tokens: int = 256  # docstring, debug, explain (reasoning included)
    max_seconds: float | None = 10.0
    diagnostics_delay: float = 1.0
    max_diagnostic_lines: int = 3000
    min_confidence: float = diagnostics.DEFAULT_MIN_CONFIDENCE  # hints below are not shown (as in review)
    features: dict[str, bool] = field(default_factory=lambda: {
        "completion": True, "inlineCompletion": True, "codeActions": True, "diagnostics": True, "hover": False,
    })

    @classmethod
    def from_config(cls, config: Config, model_path: str | None = None, device: str | None = None) -> Settings:
        """Defaults from the config file (``[lsp]`` face): model, device, and the tasks its
        ``[features]`` switch off; ``model_path``/``device`` (the command line) win."""
        s = cls(model_path=model_path or config.model, device=device or config.device,
                min_confidence=config.review.min_confidence)
        off = config.disabled_tasks()
        for task, features in (("complete", ("completion", "inlineCompletion")), ("debug", ("diagnostics",)),
                               ("explain", ("hover",))):
            if task in off:
                s.features.update(dict.fromkeys(features, False))
        return s

    def on(self, feature: str) -> bool:
        return bool(self.features.get(feature, False))

    def update(self, raw: Any) -> list[str]:
        """Apply a settings object; returns one-line problems (bad values are ignored)."""
        problems: list[str] = []
        if raw is None:
            return problems
        if not isinstance(raw, dict):
            return [f"settings must be an object, got {type(raw).__name__}"]
        if isinstance(raw.get("moecoder"), dict):
            raw = raw["moecoder"]

        def number(key: str, kind: type, lo: float, allow_none: bool = False) -> None:
            if key not in raw:
                return
            v = raw[key]
            if v is None and allow_none:
                setattr(self, _snake(key), None)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo:
                setattr(self, _snake(key), kind(v))
            else:
                problems.append(f"{key} must be a number >= {lo}, got {v!r}")

        if "modelPath" in raw:
            v = raw["modelPath"]
            if v is None or isinstance(v, str):
                self.model_path = v or None
            else:
                problems.append(f"modelPath must be a string, got {v!r}")
        if "device" in raw:
            if isinstance(raw["device"], str) and raw["device"]:
                self.device = raw["device"]
            else:
                problems.append(f"device must be a string, got {raw['device']!r}")
        number("maxTokens", int, 1)
        number("maxLineTokens", int, 1)
        number("maxTaskTokens", int, 1)
        number("contextTokens", int, 0)
        number("relatedTokens", int, 0)
        if "repositoryContext" in raw:
            if isinstance(raw["repositoryContext"], bool):
                self.repository_context = raw["repositoryContext"]
            else:
                problems.append(f"repositoryContext must be true or false, got {raw['repositoryContext']!r}")
        number("maxSeconds", float, 0.1, allow_none=True)
        number("diagnosticsDelay", float, 0.0)
        number("maxDiagnosticLines", int, 1)
        if "minConfidence" in raw and not (isinstance(raw["minConfidence"], int | float)
                                           and not isinstance(raw["minConfidence"], bool)
                                           and 0 <= raw["minConfidence"] <= 1):
            problems.append(f"minConfidence must be a number in [0, 1], got {raw['minConfidence']!r}")
        else:
            number("minConfidence", float, 0.0)
        feats = raw.get("features")
        if feats is not None:
            if not isinstance(feats, dict):
                problems.append("features must be an object of booleans")
            else:
                for k, v in feats.items():
                    if k not in self.features:
                        problems.append(f"unknown feature {k!r} (known: {', '.join(self.features)})")
                    elif not isinstance(v, bool):
                        problems.append(f"features.{k} must be true or false, got {v!r}")
                    else:
                        self.features[k] = v
        return problems


def _snake(key: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), key)


# -- engine factory ------------------------------------------------------------------------
EngineFactory = Callable[..., Engine]  # (model_dir=..., device=...) -> Engine


def config_engine_factory(config: Config | None = None) -> EngineFactory:
    """The real :class:`assistant.engine.Engine` with the config file's settings (the
    ``[lsp]`` face); the model and device passed in (flags, editor settings) win."""

    def make(model_dir: str | None = None, device: str | None = None) -> Engine:
        from assistant.remote import engine_from_settings  # in-process, or a running `moecoder serve`

        return engine_from_settings(config or load_settings().for_face("lsp"), model_dir, device)

    return make


# -- the protocol: robust framing, our own document store, client-aware capabilities -------
class _Handled:
    """Marker for a message already answered while it was being parsed."""

    jsonrpc = None


class MoeProtocol(LanguageServerProtocol):
    _server: MoeServer

    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcException as exc:
            # pygls drops requests whose params do not validate without answering them;
            # answer with InvalidParams so the client is never left waiting.
            if isinstance(data, dict) and "id" in data and "method" in data and "jsonrpc" in data:
                msg_id = data.get("id")
                if isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool):
                    err = exc if isinstance(exc, JsonRpcInvalidParams) else JsonRpcInvalidParams()
                    self._send_response(msg_id, None, err.to_response_error())
                    return _Handled()
            raise

    def handle_message(self, message):
        if isinstance(message, _Handled) or not hasattr(message, "jsonrpc"):
            log.warning("ignored a message that is not a JSON-RPC object: %.200r", message)
            return None
        return super().handle_message(message)

    @lsp_method(types.INITIALIZE)
    def lsp_initialize(self, params: types.InitializeParams):
        result = yield from super().lsp_initialize(params)
        self._server.adjust_capabilities(result.capabilities)
        return result

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams):
        self._server.on_open(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        self._server.on_change(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams):
        self._server.on_close(params)


@dataclass
class DiagState:
    version: int | None
    result_id: str
    items: list[types.Diagnostic]


class MoeServer(LanguageServer):
    def __init__(self, factory: EngineFactory, settings: Settings | None = None):
        super().__init__("moecoder", __version__, protocol_cls=MoeProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.factory = factory
        self.settings = settings or Settings()
        self.docs: dict[str, Document] = {}
        self.encoding = "utf-16"
        self.caps = types.ClientCapabilities()
        self.pull_diagnostics = False
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="moecoder-lsp")
        self._engine: Engine | None = None
        self._engine_key: tuple | None = None
        self._engine_future: concurrent.futures.Future | None = None
        self._reported_errors: set[str] = set()
        self._active: dict[str, CancelToken] = {}  # completion kind -> token of the newest request
        self._diag: dict[str, DiagState] = {}
        self._diag_timers: dict[str, asyncio.TimerHandle] = {}
        self._diag_tasks: dict[str, tuple[int | None, asyncio.Task]] = {}
        self._hints = diagnostics.HintCache()
        self._live_tokens: set[CancelToken] = set()  # tokens of engine jobs queued or running
        self._shared: dict[tuple, asyncio.Future] = {}  # (uri, version, offset) -> completion
        self._gates: dict[str, asyncio.Lock] = {}  # completion kind -> one job in the engine at a time
        self._result_ids = itertools.count(1)
        self._progress_ids = itertools.count(1)
        self._last_activity = time.monotonic()  # the last request or edit: the workspace is read when idle
        self._reader: asyncio.Task | None = None
        self._read_progress = True  # $/progress while the workspace is first read (once)

    def report_server_error(self, error: Exception, source: Any) -> None:
        """Malformed input from the client is logged, not shown to the user; errors in our
        own notification handlers are shown once."""
        if source is FeatureNotificationError:
            self.report_once(f"moecoder: internal error: {_one_line(error)}")
        elif isinstance(error, ValueError) and not isinstance(error, JsonRpcException):
            # not JSON at all: JSON-RPC says answer with a parse error and a null id
            log.warning("parse error: %s", _one_line(error))
            with contextlib.suppress(Exception):
                self.protocol._send_data({"jsonrpc": "2.0", "id": None, "error": {
                    "code": JsonRpcParseError.CODE, "message": f"Parse error: {_one_line(error)}"}})
        else:
            log.warning("%s: %s", getattr(source, "__name__", source), _one_line(error))

    # -- capabilities ---------------------------------------------------------------------
    def client_has(self, path: str, default: Any = None) -> Any:
        return get_capability(self.caps, path, default)

    def adjust_capabilities(self, caps: types.ServerCapabilities) -> None:
        """Advertise only what this client can use."""
        if self.client_has("text_document.inline_completion") is None:
            caps.inline_completion_provider = None
        if not self.pull_diagnostics:
            caps.diagnostic_provider = None
        self._hover_advertised = self.settings.on("hover")
        if not self._hover_advertised:  # off (the default): the editor's own K / hover stays in charge
            caps.hover_provider = None

    def _register_hover(self) -> None:
        """Hover switched on after initialize: register it, where the client allows that."""
        if getattr(self, "_hover_advertised", True) or not self.settings.on("hover"):
            return
        if not self.client_has("text_document.hover.dynamic_registration", False):
            self.report_once("moecoder: hover takes effect after the editor restarts the server",
                             types.MessageType.Info)
            return
        self._hover_advertised = True
        self.client_register_capability_async(types.RegistrationParams(registrations=[types.Registration(
            id="moecoder-hover", method=types.TEXT_DOCUMENT_HOVER,
            register_options=types.HoverRegistrationOptions(document_selector=[
                types.TextDocumentFilterLanguage(language="python")]))]))

    # -- engine -----------------------------------------------------------------------------
    def _engine_wanted(self) -> tuple:
        return (self.settings.model_path, self.settings.device)

    def start_engine(self) -> concurrent.futures.Future:
        """Load the engine in the background (again if the model settings changed)."""
        key = self._engine_wanted()
        if self._engine_future is not None and self._engine_key == key:
            return self._engine_future
        old = self._engine
        self._engine, self._engine_key = None, key

        def load() -> Engine:
            if old is not None:
                with contextlib.suppress(Exception):
                    old.close()
            return self.factory(model_dir=key[0], device=key[1])

        self._engine_future = fut = self.executor.submit(load)
        return fut

    async def engine(self) -> Engine:
        fut = self.start_engine()
        try:
            if not fut.done():
                async with self.progress("Loading the moecoder model"):
                    await asyncio.shield(asyncio.wrap_future(fut))
            self._engine = fut.result()
        except Exception as e:  # noqa: BLE001 - reported once, one line
            msg = _one_line(e)
            self.report_once(f"moecoder: could not load the model: {msg}")
            raise TaskFailed(msg) from None
        return self._engine

    def report_once(self, message: str, kind: types.MessageType = types.MessageType.Error) -> None:
        log.error("%s", message)
        if message not in self._reported_errors:
            self._reported_errors.add(message)
            with contextlib.suppress(Exception):
                self.window_show_message(types.ShowMessageParams(type=kind, message=message))

    async def run_task(self, request: TaskRequest, progress: Progress | None = None,
                       on_token: Callable[[CancelToken], None] | None = None, gate: asyncio.Lock | None = None) -> Any:
        """Run one task on the engine in a worker thread and return its result (None when
        its cancel token was cancelled, e.g. by a newer request). If the awaiting request is
        cancelled (``$/cancelRequest``), the engine's token is cancelled too. With ``gate``,
        one such task at a time reaches the engine, and one superseded while it waited for
        the gate never does (no prefill spent on a result nobody will see)."""
        engine = await self.engine()
        token = CancelToken()
        if on_token is not None:
            on_token(token)
        if gate is None:
            return await self._submit(engine, request, token, progress)
        async with gate:
            if token.cancelled:
                return None
            return await self._submit(engine, request, token, progress)

    async def _submit(self, engine: Engine, request: TaskRequest, token: CancelToken, progress: Progress | None) -> Any:
        self._live_tokens.add(token)
        loop = asyncio.get_running_loop()

        def work() -> Any:
            result, reasoning = None, []
            for ev in engine.stream(request, token):
                if ev.kind == "reasoning" and progress is not None:
                    reasoning.append(ev.text)
                    loop.call_soon_threadsafe(progress.reasoning, "".join(reasoning))
                elif ev.kind == "done":
                    result = ev.result
                elif ev.kind == "error":
                    if token.cancelled:
                        return None
                    raise TaskFailed(ev.text or "the engine failed")
            return result

        fut = loop.run_in_executor(self.executor, work)
        fut.add_done_callback(lambda _f: self._live_tokens.discard(token))
        try:
            result = await fut
        except asyncio.CancelledError:
            token.cancel()
            raise
        except TaskFailed:
            raise
        except Exception as e:  # noqa: BLE001 - an engine that raises instead of reporting
            log.exception("the engine raised")
            raise TaskFailed(_one_line(e)) from None
        return None if token.cancelled else result

    def _gate(self, kind: str) -> asyncio.Lock:
        gate = self._gates.get(kind)
        if gate is None:
            gate = self._gates[kind] = asyncio.Lock()
        return gate

    # -- settings ---------------------------------------------------------------------------
    def apply_settings(self, raw: Any) -> None:
        self._shared.clear()  # completions computed under the old settings are not reused
        for problem in self.settings.update(raw):
            self.report_once(f"moecoder settings: {problem}", types.MessageType.Warning)
        if self._engine_future is not None and self._engine_key != self._engine_wanted():
            self.start_engine()  # the model changed: load the new one in the background
        self._register_hover()
        with contextlib.suppress(RuntimeError):  # no running loop: settings given before the server runs
            self.start_workspace_reader()
        if not self.settings.on("diagnostics"):
            for uri in list(self._diag) + list(self._diag_timers) + list(self._diag_tasks):
                self.cancel_diagnostics(uri)
                if self._diag.pop(uri, None) is not None and not self.pull_diagnostics:
                    self.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri=uri, diagnostics=[]))

    async def pull_settings(self) -> None:
        """Ask the client for the ``moecoder`` section (``workspace/configuration``)."""
        try:
            got = await asyncio.wait_for(self.workspace_configuration_async(types.ConfigurationParams(
                items=[types.ConfigurationItem(section="moecoder")])), 5.0)
        except Exception as e:  # noqa: BLE001 - a client that cannot answer keeps the defaults
            log.info("workspace/configuration failed: %s", e)
            return
        if got and isinstance(got[0], dict) and got[0]:
            self.apply_settings(got[0])

    # -- progress -----------------------------------------------------------------------------
    def progress(self, title: str, token: Any = None) -> Progress:
        return Progress(self, title, token)

    # -- documents --------------------------------------------------------------------------
    # -- the workspace's memory, read while idle ------------------------------------------------
    def busy(self) -> None:
        """A request or an edit: the idle reader waits IDLE_READ_AFTER_S from now."""
        self._last_activity = time.monotonic()

    def start_workspace_reader(self) -> None:
        """Start reading the workspace into the completion memory while idle (repositoryContext on,
        a workspace root known; once per server)."""
        root = getattr(getattr(self, "workspace", None), "root_path", None)
        if not self.settings.repository_context or not root or (self._reader is not None and not self._reader.done()):
            return
        self._reader = asyncio.get_running_loop().create_task(self._read_workspace(root))

    async def _read_workspace(self, root: str) -> None:
        try:
            engine = await self.engine()
        except TaskFailed:
            return
        if not hasattr(engine, "read_repository"):
            return
        loop = asyncio.get_running_loop()
        progress: Progress | None = None  # shown while the first reading goes on (it spans idle moments)
        try:
            while self.settings.repository_context:
                wait = self._last_activity + IDLE_READ_AFTER_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                if engine is not self._engine:  # another model was loaded: its own memory
                    self.start_workspace_reader_later()
                    return
                seen = self._last_activity

                def stop(seen=seen) -> bool:  # a request or an edit came: give the engine back at once
                    return self._last_activity != seen

                try:
                    got = await loop.run_in_executor(self.executor, engine.read_repository, root, READ_SLICE_S, stop)
                except Exception as e:  # noqa: BLE001 - reading is a background nicety: log it, stop
                    log.warning("reading the workspace failed: %s", _one_line(e))
                    return
                if got is None:  # no local model (nothing to read with)
                    return
                if not got.get("complete") and progress is None and self._read_progress:
                    progress = await self.progress("moecoder: reading the workspace for completion").__aenter__()
                if progress is not None:
                    progress.message(f"{got.get('files', 0)} files, {got.get('entries', 0):,} positions")
                    if got.get("complete"):
                        await progress.__aexit__(None, None, None)
                        progress = None
                        self._read_progress = False  # once: later looks read edited files only
                await asyncio.sleep(memory.RECHECK_S if got.get("complete") else 0.05)
        finally:
            if progress is not None:
                await progress.__aexit__(None, None, None)

    def start_workspace_reader_later(self) -> None:
        self._reader = None
        asyncio.get_running_loop().call_soon(self.start_workspace_reader)

    def on_open(self, params: types.DidOpenTextDocumentParams) -> None:
        self.busy()
        td = params.text_document
        self.docs[td.uri] = Document(td.uri, td.text, td.version, td.language_id or "", self.encoding)
        self.schedule_diagnostics(td.uri, self.settings.diagnostics_delay)

    def on_change(self, params: types.DidChangeTextDocumentParams) -> None:
        self.busy()
        doc = self.docs.get(params.text_document.uri)
        if doc is None:
            log.warning("didChange for a document that is not open: %s", params.text_document.uri)
            return
        for change in params.content_changes:
            doc.apply_change(change)
        doc.version = params.text_document.version
        self.cancel_diagnostics(doc.uri)
        self.schedule_diagnostics(doc.uri, self.settings.diagnostics_delay)

    def on_close(self, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        self.docs.pop(uri, None)
        self.cancel_diagnostics(uri)
        self._diag.pop(uri, None)
        self._hints.forget(uri)
        if not self.pull_diagnostics:
            self.text_document_publish_diagnostics(types.PublishDiagnosticsParams(uri=uri, diagnostics=[]))

    def python_doc(self, uri: str) -> Document | None:
        doc = self.docs.get(uri)
        if doc is None:
            return None
        lang = doc.language_id.lower()
        if lang in PYTHON_IDS or (not lang and uri.endswith((".py", ".pyi"))):
            return doc
        return None

    def repository(self, doc: Document) -> dict:
        """``repo``/``recent`` of a completion request: the workspace root and the Python files
        opened or edited most recently (the assistant adds definitions from the workspace)."""
        root = getattr(getattr(self, "workspace", None), "root_path", None)
        if not self.settings.repository_context or not root:
            return {}
        recent = [_path(o.uri) for o in reversed(list(self.docs.values()))
                  if o.uri != doc.uri and o.language_id.lower() in PYTHON_IDS][:MAX_RELATED]
        return {"repo": root, "recent": recent, "repo_read_s": REPO_READ_S}

    def related(self, doc: Document) -> list[tuple[str, str]]:
        """The most recently opened other Python files, cut to ``relatedTokens`` in total
        (about 4 characters a token); none by default (they cost prefill time)."""
        chars = min(self.settings.related_tokens * 4, MAX_RELATED_CHARS)
        out: list[tuple[str, str]] = []
        if chars <= 0:
            return out
        others = [o for o in reversed(list(self.docs.values()))
                  if o.uri != doc.uri and o.language_id.lower() in PYTHON_IDS][:MAX_RELATED]
        for other in others:
            out.append((_path(other.uri), other.text[: chars // len(others)]))
        return out

    # -- completion -------------------------------------------------------------------------------
    async def complete(self, uri: str, position: types.Position, kind: str) -> tuple[Document, int, str] | None:
        """(document, cursor offset, text to insert at the cursor) or None.

        A completion and an inline completion for the same document version and cursor
        (clients that use both send both) share one engine job."""
        self.busy()
        doc = self.python_doc(uri)
        if doc is None:
            return None
        offset = doc.offset_at(position)
        if offset is None:
            return None
        key = (uri, doc.version, offset)
        shared = self._shared.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        shared = self._shared[key] = asyncio.get_running_loop().create_future()
        while len(self._shared) > 8:
            self._shared.pop(next(iter(self._shared)))
        value = None
        try:
            value = await self._complete(doc, offset, kind)
            return value
        finally:
            if not shared.done():
                shared.set_result(value)

    async def _complete(self, doc: Document, offset: int, kind: str) -> tuple[Document, int, str] | None:
        uri = doc.uri
        version, text = doc.version, doc.text
        line, col = doc.engine_line_col(offset)
        _, line_end = doc.line_bounds(doc.position_at(offset).line)
        multiline_ok = not text[offset:line_end].strip()
        try:
            await self.engine()  # loaded before diagnostics yield to it
        except TaskFailed:
            return None
        # the engine runs one job at a time: a completion must not queue behind hint
        # computation, so that yields (finished functions stay cached) and runs again later
        for other in [u for u, (_, t) in self._diag_tasks.items() if not t.done()]:
            self.cancel_diagnostics(other)
            self.schedule_diagnostics(other, self.settings.diagnostics_delay)
        # code after the cursor on its line: the assistant will stop at the line end
        max_new = self.settings.max_tokens if multiline_ok else min(self.settings.max_tokens,
                                                                    self.settings.max_line_tokens)
        # the whole document: assistant.context fits it into contextTokens (once, for every face)
        request = TaskRequest(task="complete", source=text, path=_path(uri), line=line, column=col,
                              related=self.related(doc), max_new_tokens=max_new,
                              max_seconds=self.settings.max_seconds, context_tokens=self.settings.context_tokens or None,
                              **self.repository(doc))
        mine: list[CancelToken] = []

        def supersede(token: CancelToken) -> None:
            previous = self._active.get(kind)
            if previous is not None:
                previous.cancel()  # a newer request supersedes it
            self._active[kind] = token
            mine.append(token)

        try:
            result = await self.run_task(request, on_token=supersede, gate=self._gate(kind))
        except TaskFailed as e:
            log.warning("completion failed: %s", e)
            return None
        finally:
            if mine and self._active.get(kind) is mine[0]:
                del self._active[kind]
        if result is None:
            return None
        current = self.docs.get(uri)
        if current is None or current.version != version or current.text != text:
            log.info("dropped a completion for stale version %s of %s", version, uri)
            return None
        out = result.text
        # the assistant decides single- vs multi-line from the syntax at the cursor
        if not result.multiline:
            out = out.split("\n", 1)[0]
        out = out.rstrip("\r") if "\n" not in out else out
        if not out.strip():
            return None
        return doc, offset, out

    # -- diagnostics ------------------------------------------------------------------------------
    def schedule_diagnostics(self, uri: str, delay: float) -> None:
        if not self.settings.on("diagnostics") or self.python_doc(uri) is None:
            return
        timer = self._diag_timers.pop(uri, None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            self._diag_timers[uri] = loop.call_later(delay, self._diag_timer_fired, uri)

    def _diag_timer_fired(self, uri: str) -> None:
        self._diag_timers.pop(uri, None)
        self.start_diagnostics(uri)

    def cancel_diagnostics(self, uri: str) -> None:
        timer = self._diag_timers.pop(uri, None)
        if timer is not None:
            timer.cancel()
        running = self._diag_tasks.pop(uri, None)
        if running is not None:
            running[1].cancel()  # run_task cancels the engine's token

    def start_diagnostics(self, uri: str) -> asyncio.Task | None:
        doc = self.python_doc(uri)
        if doc is None or not self.settings.on("diagnostics"):
            return None
        running = self._diag_tasks.get(uri)
        if running is not None and running[0] == doc.version and not running[1].done():
            return running[1]
        self.cancel_diagnostics(uri)
        task = asyncio.ensure_future(self._compute_diagnostics(doc))
        self._diag_tasks[uri] = (doc.version, task)
        task.add_done_callback(lambda t, u=uri: self._diag_done(u, t))
        return task

    def _diag_done(self, uri: str, task: asyncio.Task) -> None:
        running = self._diag_tasks.get(uri)
        if running is not None and running[1] is task:
            del self._diag_tasks[uri]
        if not task.cancelled() and task.exception() is not None:
            log.warning("diagnostics failed: %s", task.exception())

    async def _compute_diagnostics(self, doc: Document) -> None:
        """Debug the file's functions by the rules of ``assistant.diagnostics`` (the review's):
        functions whose text is unchanged since the last run reuse their hints (shifted if
        moved); hints below ``minConfidence`` are not shown."""
        uri, version, text = doc.uri, doc.version, doc.text
        items: list[types.Diagnostic] = []
        if doc.line_count > self.settings.max_diagnostic_lines:
            log.info("no diagnostics for %s: %d lines > maxDiagnosticLines", uri, doc.line_count)
        else:
            hints, todo = self._hints.plan(uri, text)
            if todo:
                async with self.progress(f"moecoder: checking {len(todo)} function(s) for bugs") as progress:
                    for n, check in enumerate(todo, 1):
                        progress.message(f"{n}/{len(todo)} {check.name}")
                        request = diagnostics.debug_request(
                            text, _path(uri), check.name, check.start_line, max_new_tokens=self.settings.max_task_tokens,
                            max_seconds=None if self.settings.max_seconds is None else self.settings.max_seconds * 6)
                        try:
                            result = await self.run_task(request, progress)
                        except TaskFailed as e:
                            log.warning("debug task failed for %s: %s", check.name, e)
                            continue
                        if result is None:  # stopped: not a verdict, do not cache it
                            continue
                        self._hints.record(uri, check, result.hints)
                        hints += result.hints
            hints = diagnostics.Policy(self.settings.min_confidence).keep(hints)
            snapshot = Document(uri, text, version, doc.language_id, self.encoding)
            items = [d for d in (self._diagnostic(snapshot, h) for h in hints) if d is not None]
        current = self.docs.get(uri)
        if current is None or current.version != version:
            return  # stale: the next idle/save run will replace it
        self._diag[uri] = DiagState(version, str(next(self._result_ids)), items)
        if self.pull_diagnostics:
            with contextlib.suppress(Exception):
                self.workspace_diagnostic_refresh(None)
        else:
            self.text_document_publish_diagnostics(
                types.PublishDiagnosticsParams(uri=uri, diagnostics=items, version=version))

    def _diagnostic(self, doc: Document, hint: Hint) -> types.Diagnostic | None:
        start = doc.engine_line_offset(hint.line)
        if start is None:
            return None
        line_text = doc.engine_line_text(hint.line)
        indent = len(line_text) - len(line_text.lstrip())
        rng = doc.range_of(start + indent, start + len(line_text))
        conf = float(hint.confidence)
        severity = _SEVERITY[diagnostics.Policy.level(conf)]
        message = f"{hint.message} (confidence {conf:.0%})"
        reasoning = (hint.reasoning or "").strip()
        related = None
        if reasoning:
            if self.client_has("text_document.publish_diagnostics.related_information", False) or (
                    self.client_has("text_document.diagnostic.related_information", False)):
                related = [types.DiagnosticRelatedInformation(
                    location=types.Location(uri=doc.uri, range=rng), message=f"Reasoning: {reasoning}")]
            else:
                message += f"\nReasoning: {reasoning}"
        data = {"fix": hint.fix, "line": hint.line, "version": doc.version, "text": line_text}
        return types.Diagnostic(range=rng, message=message, severity=severity, source=SOURCE,
                                code="debug-hint", related_information=related, data=data)

    # -- code actions ---------------------------------------------------------------------------
    def fix_action(self, doc: Document, diag: types.Diagnostic) -> types.CodeAction | None:
        data = diag.data if isinstance(diag.data, dict) else None
        if diag.source != SOURCE or not data or not isinstance(data.get("fix"), str):
            return None
        line = data.get("line")
        if not isinstance(line, int):
            return None
        start = doc.engine_line_offset(line)
        if start is None or doc.engine_line_text(line) != data.get("text"):
            return None  # the line changed since the hint: the fix no longer applies
        old = doc.engine_line_text(line)
        fix = data["fix"]
        if fix and not fix[:1].isspace():  # keep the line's indentation
            fix = old[: len(old) - len(old.lstrip())] + fix
        edit = self.workspace_edit(doc, [types.TextEdit(range=doc.range_of(start, start + len(old)), new_text=fix)])
        return types.CodeAction(title=f"Apply fix: {fix.strip()[:60]}", kind=types.CodeActionKind.QuickFix,
                                diagnostics=[diag], edit=edit, is_preferred=True)

    async def find_bug(self, uri: str, name: str, progress_token: Any = None) -> dict[str, Any]:
        """The "Find the bug (runs examples)" command: debugging from evidence for one function
        (its doctest examples and the tests that call it run in a sandbox; fixes are verified by
        running them). The hints become diagnostics (a verified fix is a quick fix); the
        summary goes to the client as a message. This runs the user's code: only on request."""
        from assistant.debugging import DebugOptions, debug_stream

        doc = self.python_doc(uri)
        if doc is None:
            return {"error": "not an open Python document"}
        engine = await self.engine()
        version, text = doc.version, doc.text
        loop = asyncio.get_running_loop()
        async with self.progress(f"moecoder: finding the bug in {name} (runs examples)", progress_token) as progress:
            def work() -> tuple[Any, str | None]:
                result, reasoning, error = None, [], None
                for ev in debug_stream(engine, _path(uri), text, [name], DebugOptions()):
                    if ev.kind == "reasoning":
                        reasoning.append(ev.text)
                        loop.call_soon_threadsafe(progress.reasoning, "".join(reasoning))
                    elif ev.kind == "done":
                        result = ev.result
                    elif ev.kind == "error":
                        error = ev.text
                return result, error

            result, error = await loop.run_in_executor(self.executor, work)
        if error or result is None:
            msg = error or "no result"
            self.report_once(f"moecoder: find the bug: {msg}", types.MessageType.Warning)
            return {"error": msg}
        snapshot = Document(uri, text, version, doc.language_id, self.encoding)
        items = [d for d in (self._diagnostic(snapshot, h) for h in result.hints) if d is not None]
        current = self.docs.get(uri)
        if current is not None and current.version == version:
            state = self._diag.get(uri)
            keep = [d for d in state.items if d.range.start.line not in {i.range.start.line for i in items}] \
                if state is not None and state.version == version else []
            self._diag[uri] = DiagState(version, str(next(self._result_ids)), keep + items)
            if self.pull_diagnostics:
                with contextlib.suppress(Exception):
                    self.workspace_diagnostic_refresh(None)
            else:
                self.text_document_publish_diagnostics(
                    types.PublishDiagnosticsParams(uri=uri, diagnostics=keep + items, version=version))
        h = result.hints[0] if result.hints else None
        summary = (f"{name}: line {h.line + 1}: {h.message}" + (f" — fix: {h.fix.strip()}" if h.fix else "")
                   if h else f"{name}: no bug found")
        with contextlib.suppress(Exception):
            self.window_show_message(types.ShowMessageParams(type=types.MessageType.Info, message=summary))
        return {"summary": summary, "reasoning": result.reasoning,
                "hints": [{"line": x.line, "message": x.message, "fix": x.fix, "confidence": x.confidence,
                           "evidence": x.evidence} for x in result.hints]}

    def workspace_edit(self, doc: Document, edits: list[types.TextEdit]) -> types.WorkspaceEdit:
        if self.client_has("workspace.workspace_edit.document_changes", False):
            return types.WorkspaceEdit(document_changes=[types.TextDocumentEdit(
                text_document=types.OptionalVersionedTextDocumentIdentifier(uri=doc.uri, version=doc.version),
                edits=edits)])
        return types.WorkspaceEdit(changes={doc.uri: edits})

    async def docstring_edit(self, action: types.CodeAction, progress_token: Any = None) -> types.CodeAction:
        data = action.data if isinstance(action.data, dict) else {}
        doc = self.python_doc(str(data.get("uri", "")))
        name, line = data.get("function"), data.get("line")
        if doc is None or not isinstance(name, str) or not isinstance(line, int):
            return action
        version, text = doc.version, doc.text
        request = TaskRequest(task="comment", source=text, path=_path(doc.uri), line=line, function=name,
                              max_new_tokens=self.settings.max_task_tokens,
                              max_seconds=None if self.settings.max_seconds is None else self.settings.max_seconds * 6)
        async with self.progress(f"moecoder: docstring for {name}", progress_token) as progress:
            try:
                result = await self.run_task(request, progress)
            except TaskFailed as e:
                self.report_once(f"moecoder: no docstring for {name}: {e}", types.MessageType.Warning)
                return action
        if result is None:
            return action
        snapshot = Document(doc.uri, text, version, doc.language_id, self.encoding)
        body = str(result.text)
        new = result.indent + body + "\n"
        rs, re_ = result.replace_start, result.replace_end
        if isinstance(rs, int) and isinstance(re_, int):
            s, e = snapshot.engine_line_offset(rs), snapshot.engine_line_offset(re_ + 1)
            s = len(text) if s is None else s
            e = len(text) if e is None else e
        else:
            s = snapshot.engine_line_offset(int(result.insert_line))
            if s is None:  # after the last line
                s = len(text)
                if text and not text.endswith("\n"):
                    new = "\n" + new
            e = s
        edit = types.TextEdit(range=snapshot.range_of(s, e), new_text=new)
        action.edit = self.workspace_edit(snapshot, [edit])
        return action


class Progress:
    """``$/progress`` for one piece of work: a client token, a server-created one, or nothing."""

    def __init__(self, server: MoeServer, title: str, token: Any = None):
        self.server, self.title, self.token = server, title, token
        self._last = 0.0

    async def __aenter__(self) -> Progress:
        s = self.server
        if self.token is None and s.client_has("window.work_done_progress", False):
            token = f"moecoder-{next(s._progress_ids)}"
            # shielded: when typing cancels this work, the request stays pending until the client
            # answers (a cancelled request future would make pygls log InvalidStateError then)
            request = asyncio.ensure_future(s.work_done_progress.create_async(token))
            request.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "never retrieved"
            try:
                await asyncio.wait_for(asyncio.shield(request), 5.0)
                self.token = token
            except Exception as e:  # noqa: BLE001 - progress is optional
                log.info("no progress: %s", e)
        if self.token is not None:
            s.work_done_progress.begin(self.token, types.WorkDoneProgressBegin(title=self.title, cancellable=False))
        return self

    def message(self, text: str) -> None:
        if self.token is not None:
            self.server.work_done_progress.report(self.token, types.WorkDoneProgressReport(message=text))

    def reasoning(self, text: str) -> None:
        now = time.monotonic()
        if self.token is None or now - self._last < 0.25:
            return
        self._last = now
        tail = " ".join(text.split())[-80:]
        self.server.work_done_progress.report(self.token, types.WorkDoneProgressReport(message=f"thinking: {tail}"))

    async def __aexit__(self, *exc: object) -> None:
        if self.token is not None:
            with contextlib.suppress(Exception):
                self.server.work_done_progress.end(self.token, types.WorkDoneProgressEnd())


_CLOSERS = frozenset(")]}\"'")


def closing_overlap(text: str, rest: str) -> int:
    """How many closing brackets/quotes at the start of ``rest`` (the code after the cursor)
    ``text`` (a one-line completion) already ends with: ``("a, b)", "):")`` -> 1."""
    k = 0
    while k < len(rest) and rest[k] in _CLOSERS and text.endswith(rest[:k + 1]):
        k += 1
    return k


def _rest_of_line(doc: Document, offset: int) -> str:
    end = doc.text.find("\n", offset)
    return doc.text[offset:] if end < 0 else doc.text[offset:end].rstrip("\r")


def _path(uri: str) -> str:
    from pygls.uris import to_fs_path

    return to_fs_path(uri) or uri


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _function_at(source: str, line: int) -> tuple[str, int, int, bool] | None:
    """(qualified name, def line, last line, has a docstring) of the innermost function
    around 0-based ``line`` (``assistant.code``, tree-sitter), or None."""
    from assistant import code

    try:
        fn = code.function_at(source, line)
    except Exception:  # noqa: BLE001 - whatever the parser makes of broken code: no action
        return None
    if fn is None:
        return None
    return fn.qualname, fn.start_line, fn.end_line, fn.docstring is not None


# -- handlers -----------------------------------------------------------------------------------
def build_server(factory: EngineFactory | None = None, settings: Settings | None = None) -> MoeServer:
    """The server; ``factory`` makes its engine (default: the real one, config file settings)."""
    server = MoeServer(factory or config_engine_factory(), settings)

    @server.feature(types.INITIALIZE)
    def initialize(ls: MoeServer, params: types.InitializeParams) -> None:
        ls.caps = params.capabilities or types.ClientCapabilities()
        ls.encoding = normalize_encoding(ServerCapabilitiesBuilder.choose_position_encoding(ls.caps))
        # pull only where the server can ask for a re-pull when new hints are ready
        # (workspace/diagnostic/refresh); otherwise push them (Neovim 0.10-0.12, eglot, ...)
        ls.pull_diagnostics = (ls.client_has("text_document.diagnostic") is not None
                               and bool(ls.client_has("workspace.diagnostics.refresh_support", False)))
        for problem in ls.settings.update(params.initialization_options):
            ls.report_once(f"moecoder settings: {problem}", types.MessageType.Warning)

    @server.feature(types.INITIALIZED)
    async def initialized(ls: MoeServer, params: types.InitializedParams) -> None:
        if ls.client_has("workspace.configuration", False):
            await ls.pull_settings()
        ls.start_engine()
        ls.start_workspace_reader()

    @server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
    async def did_change_configuration(ls: MoeServer, params: types.DidChangeConfigurationParams) -> None:
        if params.settings in (None, {}) and ls.client_has("workspace.configuration", False):
            await ls.pull_settings()  # "settings changed, ask me": the pull model
        else:
            ls.apply_settings(params.settings)

    @server.feature(types.TEXT_DOCUMENT_DID_SAVE, types.SaveOptions(include_text=False))
    def did_save(ls: MoeServer, params: types.DidSaveTextDocumentParams) -> None:
        uri = params.text_document.uri
        timer = ls._diag_timers.pop(uri, None)
        if timer is not None:
            timer.cancel()
        ls.start_diagnostics(uri)

    @server.feature(types.TEXT_DOCUMENT_COMPLETION,
                    types.CompletionOptions(trigger_characters=[".", "(", ",", "="], resolve_provider=False))
    async def completion(ls: MoeServer, params: types.CompletionParams) -> types.CompletionList:
        empty = types.CompletionList(is_incomplete=True, items=[])
        if not ls.settings.on("completion"):
            return empty
        got = await ls.complete(params.text_document.uri, params.position, "completion")
        if got is None:
            return empty
        doc, offset, text = got
        line_start = doc.starts[doc.position_at(offset).line]
        word = _WORD_TAIL.search(doc.text[line_start:offset]).group()
        rest = _rest_of_line(doc, offset)
        if "\n" not in text and (k := closing_overlap(text, rest)):
            text = text[:-k]  # `max(|)` + "a, b)": the ")" is there already
        new_text = word + text
        first = new_text.split("\n", 1)[0].strip() or new_text.strip()
        label = first if len(first) <= 60 else first[:57] + "..."
        multiline = "\n" in text
        item = types.CompletionItem(
            label=label, kind=types.CompletionItemKind.Text, detail="moecoder" + (" (multi-line)" if multiline else ""),
            text_edit=types.TextEdit(range=doc.range_of(offset - len(word), offset), new_text=new_text),
            filter_text=new_text, sort_text="0", insert_text_format=types.InsertTextFormat.PlainText,
            documentation=types.MarkupContent(kind=types.MarkupKind.Markdown, value=f"```python\n{new_text}\n```")
            if multiline else None,
        )
        return types.CompletionList(is_incomplete=True, items=[item])

    @server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
    async def inline_completion(ls: MoeServer, params: types.InlineCompletionParams
                                ) -> types.InlineCompletionList | None:
        if not ls.settings.on("inlineCompletion"):
            return None
        got = await ls.complete(params.text_document.uri, params.position, "inline")
        if got is None:
            return None
        doc, offset, text = got
        rest = _rest_of_line(doc, offset)
        if "\n" in text or not rest.strip():
            return types.InlineCompletionList(items=[types.InlineCompletionItem(
                insert_text=text, range=doc.range_of(offset, offset))])
        # code follows the cursor: the item replaces the rest of the line with the completion and
        # that code, so the editor draws the whole line instead of the suggestion over the code,
        # and a closing bracket the completion also writes is not doubled
        k = closing_overlap(text, rest)
        return types.InlineCompletionList(items=[types.InlineCompletionItem(
            insert_text=text + rest[k:], range=doc.range_of(offset, offset + len(rest)))])

    @server.feature(types.TEXT_DOCUMENT_DIAGNOSTIC,
                    types.DiagnosticOptions(identifier=SOURCE, inter_file_dependencies=False,
                                            workspace_diagnostics=False))
    async def diagnostic(ls: MoeServer, params: types.DocumentDiagnosticParams):
        uri = params.text_document.uri
        doc = ls.python_doc(uri)
        if doc is None or not ls.settings.on("diagnostics"):
            return types.RelatedFullDocumentDiagnosticReport(items=[])
        running = ls._diag_tasks.get(uri)
        task = running[1] if running is not None else None
        if task is None and uri not in ls._diag and uri not in ls._diag_timers:
            task = ls.start_diagnostics(uri)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(task)
        state = ls._diag.get(uri)
        if state is None:
            return types.RelatedFullDocumentDiagnosticReport(items=[])
        if params.previous_result_id == state.result_id:
            return types.RelatedUnchangedDocumentDiagnosticReport(result_id=state.result_id)
        return types.RelatedFullDocumentDiagnosticReport(items=state.items, result_id=state.result_id)

    @server.feature(types.TEXT_DOCUMENT_CODE_ACTION, types.CodeActionOptions(
        code_action_kinds=[types.CodeActionKind.QuickFix, DOCSTRING_KIND, FIND_BUG_KIND], resolve_provider=True))
    async def code_action(ls: MoeServer, params: types.CodeActionParams) -> list[types.CodeAction] | None:
        if not ls.settings.on("codeActions"):
            return None
        doc = ls.python_doc(params.text_document.uri)
        if doc is None:
            return None
        start = doc.offset_at(params.range.start)
        if start is None:
            return None
        only = params.context.only
        actions: list[types.CodeAction] = []

        def wanted(kind: str) -> bool:
            return not only or any(kind == k or kind.startswith(str(k) + ".") for k in only)

        if wanted(types.CodeActionKind.QuickFix):
            diags = list(params.context.diagnostics or [])
            state = ls._diag.get(doc.uri)
            if state is not None:
                lo, hi = params.range.start.line, params.range.end.line
                seen = {(d.range.start.line, d.message) for d in diags}
                diags += [d for d in state.items if lo <= d.range.start.line <= hi
                          and (d.range.start.line, d.message) not in seen]
            for d in diags:
                action = ls.fix_action(doc, d)
                if action is not None:
                    actions.append(action)
        if wanted(FIND_BUG_KIND):
            line, _ = doc.engine_line_col(start)
            fn = _function_at(doc.text, line)
            if fn is not None:
                actions.append(types.CodeAction(
                    title=f"{FIND_BUG_TITLE}: {fn[0]}", kind=FIND_BUG_KIND,
                    command=types.Command(title=FIND_BUG_TITLE, command=FIND_BUG_COMMAND,
                                          arguments=[doc.uri, fn[0]])))
        if wanted(DOCSTRING_KIND):
            line, _ = doc.engine_line_col(start)
            fn = _function_at(doc.text, line)
            if fn is not None and not fn[3]:
                name, def_line = fn[0], fn[1]
                action = types.CodeAction(title=f"Add docstring to {name}", kind=DOCSTRING_KIND,
                                          data={"kind": "docstring", "uri": doc.uri, "version": doc.version,
                                                "function": name, "line": def_line})
                resolvable = ls.client_has("text_document.code_action.resolve_support.properties", []) or []
                if "edit" not in resolvable:  # the client cannot resolve: compute the edit now
                    action = await ls.docstring_edit(action, params.work_done_token)
                actions.append(action)
        return actions

    @server.command(FIND_BUG_COMMAND)
    async def find_bug_command(ls: MoeServer, *args: Any) -> Any:
        flat = list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else list(args)
        if len(flat) < 2 or not isinstance(flat[0], str) or not isinstance(flat[1], str):
            return {"error": f"{FIND_BUG_COMMAND} takes [uri, function]"}
        try:
            return await ls.find_bug(flat[0], flat[1])
        except TaskFailed as e:
            return {"error": str(e)}

    @server.feature(types.CODE_ACTION_RESOLVE)
    async def code_action_resolve(ls: MoeServer, action: types.CodeAction) -> types.CodeAction:
        data = action.data if isinstance(action.data, dict) else {}
        if data.get("kind") == "docstring" and action.edit is None:
            return await ls.docstring_edit(action)
        return action

    @server.feature(types.TEXT_DOCUMENT_HOVER)
    async def hover(ls: MoeServer, params: types.HoverParams) -> types.Hover | None:
        if not ls.settings.on("hover"):
            return None
        doc = ls.python_doc(params.text_document.uri)
        if doc is None:
            return None
        offset = doc.offset_at(params.position)
        if offset is None:
            return None
        line, _ = doc.engine_line_col(offset)
        if not doc.engine_line_text(line).strip():
            return None
        fn = _function_at(doc.text, line)
        start, end = (fn[1], fn[2]) if fn is not None else (line, line)
        request = TaskRequest(task="explain", source=doc.text, path=_path(doc.uri), line=start, end_line=end,
                              function=fn[0] if fn is not None else None,
                              max_new_tokens=ls.settings.max_task_tokens, max_seconds=ls.settings.max_seconds)
        async with ls.progress("moecoder: explaining", params.work_done_token) as progress:
            try:
                result = await ls.run_task(request, progress)
            except TaskFailed as e:
                log.warning("explain failed: %s", e)
                return None
        if result is None or not result.text.strip():
            return None
        reasoning = (result.reasoning or "").strip()
        value = (f"*Reasoning:* {reasoning}\n\n---\n\n" if reasoning else "") + str(result.text).strip()
        s, e = doc.engine_line_offset(start), doc.engine_line_offset(end)
        rng = doc.range_of(s, e + len(doc.engine_line_text(end))) if s is not None and e is not None else None
        return types.Hover(contents=types.MarkupContent(kind=types.MarkupKind.Markdown, value=value), range=rng)

    @server.feature(types.SHUTDOWN)
    def shutdown(ls: MoeServer, *args: Any) -> None:
        for token in list(ls._active.values()) + list(ls._live_tokens):
            token.cancel()  # so that closing the engine does not wait for their jobs
        for uri in list(ls._diag_tasks):
            ls.cancel_diagnostics(uri)
        eng = ls._engine
        if eng is not None:
            with contextlib.suppress(Exception):
                eng.close()

    return server


# -- entry point --------------------------------------------------------------------------------
def main(argv: list[str] | None = None, factory: EngineFactory | None = None,
         build: Callable[[EngineFactory, Settings], MoeServer] | None = None) -> int:
    """``moecoder lsp``. ``factory``/``build`` are for tests (a scripted engine, extra commands)."""
    args = _parser().parse_args(argv)
    host, port = None, None
    if args.tcp is not None:
        host, _, port_s = args.tcp.rpartition(":")
        if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            print(f"moecoder lsp: error: --tcp wants HOST:PORT, got {args.tcp!r}", file=sys.stderr)
            return 2
        port = int(port_s)
    if args.model is not None and not os.path.isdir(args.model):
        print(f"moecoder lsp: error: model directory not found: {args.model}", file=sys.stderr)
        return 2
    try:
        config = face_settings("lsp", args.server)
    except ValueError as e:
        print(f"moecoder lsp: error: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        handler: logging.Handler = (logging.FileHandler(args.log_file) if args.log_file
                                    else logging.StreamHandler(sys.stderr))
    except OSError as e:
        print(f"moecoder lsp: error: cannot write the log file {args.log_file}: {e.strerror or e}", file=sys.stderr)
        return 2
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(args.log_level)
    settings = Settings.from_config(config, model_path=args.model, device=args.device)
    server = (build or build_server)(factory or config_engine_factory(config), settings)
    if host is not None:
        try:
            server.start_tcp(host, port)
        except OSError as e:
            print(f"moecoder lsp: error: cannot listen on {host}:{port}: {e.strerror or e}", file=sys.stderr)
            return 2
        return 0
    # stdout is the protocol channel: anything else printing there (a library, a C
    # extension) would corrupt it, so fd 1 goes to stderr and the server gets a private copy.
    sys.stdout.flush()
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from lsp.transport import start_io  # the robust reader (resyncs, caps bodies, answers every request)

    return start_io(server, sys.stdin.buffer, proto_out)


if __name__ == "__main__":
    sys.exit(main())
