"""Helpers for the LSP tests: server command, client capabilities, small request wrappers."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

from lsprotocol import types
from pytest_lsp import LanguageClient, client_capabilities

ROOT = Path(__file__).resolve().parent.parent
SERVER_CMD = [sys.executable, "-m", "tests.lsp_fake_server"]  # the server on the scripted engine
REAL_SERVER_CMD = [sys.executable, "-m", "assistant.cli", "lsp"]  # the product, on the real engine


def server_env(config: str | Path | None = None) -> dict[str, str]:
    """The environment of a server under test: this checkout first on the path, and the
    config file ``config`` (default: none, whatever the user has)."""
    env = dict(os.environ)
    env["MOECODER_CONFIG"] = str(config) if config is not None else str(ROOT / "tests" / "no-such-config.toml")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def capabilities(base: str = "neovim@v0.10.0", inline: bool = True, encodings: list[str] | None = None,
                 refresh: bool = True) -> types.ClientCapabilities:
    """A recorded client's capabilities, plus inline completion and diagnostic refresh
    support (what a pull-diagnostics client like VS Code declares)."""
    caps = client_capabilities(base)
    if refresh and caps.text_document.diagnostic is not None:
        caps.workspace = caps.workspace or types.WorkspaceClientCapabilities()
        caps.workspace.diagnostics = types.DiagnosticWorkspaceClientCapabilities(refresh_support=True)
    if inline:
        caps.text_document.inline_completion = types.InlineCompletionClientCapabilities()
    if encodings is not None:
        caps.general = caps.general or types.GeneralClientCapabilities()
        caps.general.position_encodings = encodings
    return caps


def uri_for(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p.as_uri()


def open_doc(client: LanguageClient, uri: str, text: str, version: int = 1, language: str = "python") -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id=language, version=version, text=text)))


def change_doc(client: LanguageClient, uri: str, version: int, start: tuple[int, int], end: tuple[int, int],
               text: str) -> None:
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(start=types.Position(*start), end=types.Position(*end)), text=text)]))


async def complete(client: LanguageClient, uri: str, line: int, character: int) -> types.CompletionList:
    return await client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, character)))


async def inline(client: LanguageClient, uri: str, line: int, character: int):
    return await client.text_document_inline_completion_async(types.InlineCompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, character),
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)))


async def stats(client: LanguageClient) -> dict:
    return await client.workspace_execute_command_async(types.ExecuteCommandParams(command="moecoder.engineStats"))


def send_raw_request(client: LanguageClient, method: str, params) -> tuple[str, asyncio.Future]:
    """A request whose id we know (to cancel it)."""
    msg_id = str(uuid.uuid4())
    fut = asyncio.wrap_future(client.protocol.send_request(method, params, msg_id=msg_id))
    return msg_id, fut


def raw_request(client: LanguageClient, method: str, params) -> asyncio.Future:
    """Send a request with untyped (possibly wrong) params; the future gets the response."""
    from concurrent.futures import Future

    msg_id = str(uuid.uuid4())
    fut: Future = Future()
    client.protocol._request_futures[msg_id] = fut
    client.protocol._send_data({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return asyncio.wrap_future(fut)


def apply_edits(text: str, edits: list[types.TextEdit]) -> str:
    """Apply UTF-16 LSP edits (non-overlapping) to ``text``."""
    lines = text.split("\n")

    def offset(p: types.Position) -> int:
        before = sum(len(line) + 1 for line in lines[: p.line])
        line = lines[p.line] if p.line < len(lines) else ""
        units, i = 0, 0
        while i < len(line) and units < p.character:
            units += 2 if ord(line[i]) > 0xFFFF else 1
            i += 1
        return before + i

    for e in sorted(edits, key=lambda e: (e.range.start.line, e.range.start.character), reverse=True):
        s, t = offset(e.range.start), offset(e.range.end)
        text = text[:s] + e.new_text + text[t:]
    return text


def edits_of(edit: types.WorkspaceEdit, uri: str) -> list[types.TextEdit]:
    if edit.document_changes:
        return [e for dc in edit.document_changes if dc.text_document.uri == uri for e in dc.edits]
    return list((edit.changes or {}).get(uri, []))
