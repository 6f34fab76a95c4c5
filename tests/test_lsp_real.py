"""The server on the real Engine with the tiny random-weight model (``tiny_model_dir``).

Random weights write nonsense, so this checks mechanics: the model loads from the
settings, every request answers with well-formed results anchored at the cursor, and
the resolve step returns a code action whose edit (if any) inserts at the right line.
"""

from __future__ import annotations

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.lsp_support import (
    REAL_SERVER_CMD,
    ROOT,
    apply_edits,
    capabilities,
    complete,
    edits_of,
    inline,
    open_doc,
    server_env,
    uri_for,
)

TEXT = (
    "import math\n"
    "\n"
    "\n"
    "def circle_area(radius):\n"
    "    if radius < 0:\n"
    "        raise ValueError('negative')\n"
    "    return math.pi * radius ** 2\n"
    "\n"
    "\n"
    "def total(values):\n"
    "    result = 0\n"
    "    for v in values:\n"
    "        result += v\n"
    "    return res\n"
)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=REAL_SERVER_CMD, server_env=server_env()))
async def real_client(lsp_client: LanguageClient):
    yield
    await lsp_client.shutdown_session()


async def test_real_engine_on_the_tiny_model(real_client: LanguageClient, tiny_model_dir, tmp_path):
    client = real_client
    await client.initialize_session(types.InitializeParams(
        capabilities=capabilities(), initialization_options={"moecoder": {
            "modelPath": str(tiny_model_dir), "maxTokens": 8, "maxTaskTokens": 12, "maxSeconds": 30, "diagnosticsDelay": 60}}))
    uri = uri_for(tmp_path, "geo.py", TEXT)
    open_doc(client, uri, TEXT)

    # completion in the middle of a line: single line, replacing the word before the cursor
    res = await complete(client, uri, 6, 18)  # "    return math.pi| * radius ** 2"
    assert isinstance(res, types.CompletionList)
    for item in res.items:
        assert "\n" not in item.text_edit.new_text
        assert item.text_edit.range.end == types.Position(6, 18)
        assert item.text_edit.range.start == types.Position(6, 16)  # "pi" is the word being completed
        assert item.text_edit.new_text.startswith("pi")

    # inline completion at the end of the file's last line
    got = await inline(client, uri, 13, 14)
    if got is not None:
        for item in got.items:
            assert item.range.start == item.range.end == types.Position(13, 14)
            assert item.insert_text.strip()

    # code action + resolve on the real comment task
    actions = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=types.Range(start=types.Position(5, 8), end=types.Position(5, 8)),
        context=types.CodeActionContext(diagnostics=[])))
    (action,) = [a for a in actions if a.title == "Add docstring to circle_area"]
    resolved = await client.code_action_resolve_async(action)
    assert resolved.title == action.title
    if resolved.edit is not None:
        (edit,) = edits_of(resolved.edit, uri)
        assert edit.range.start.line == 4 and edit.range.start.character == 0  # before the body
        new = apply_edits(TEXT, [edit])
        assert new.startswith(TEXT.split("    if radius")[0])
        assert new.endswith(TEXT[TEXT.index("    if radius"):])

    # pull diagnostics from the real debug task (on save)
    client.text_document_did_save(types.DidSaveTextDocumentParams(text_document=types.TextDocumentIdentifier(uri)))
    report = await client.text_document_diagnostic_async(types.DocumentDiagnosticParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))
    assert report.kind == "full"
    for d in report.items:
        assert d.source == "moecoder" and 0 <= d.range.start.line <= 13


async def test_a_missing_model_is_reported_once_and_requests_stay_empty(real_client: LanguageClient, tmp_path):
    client = real_client
    empty_model = tmp_path / "no_weights"
    empty_model.mkdir()
    await client.initialize_session(types.InitializeParams(
        capabilities=capabilities(), initialization_options={"modelPath": str(empty_model)}))
    uri = uri_for(tmp_path, "m.py", "x = 1\n")
    open_doc(client, uri, "x = 1\n")
    for _ in range(2):
        res = await complete(client, uri, 0, 5)
        assert not res.items
    errors = [m for m in client.messages if m.type == types.MessageType.Error]
    assert len(errors) == 1 and "could not load the model" in errors[0].message
    assert "\n" not in errors[0].message


SHIPPED = ROOT / "model" / "weights" / "model.safetensors"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped model in model/weights/")
async def test_shipped_model_completes_lines_being_typed(real_client: LanguageClient, tmp_path):
    """The default model (no modelPath): lines cut where a user is typing get a one-line
    completion anchored at the cursor. (At least one of three: the model, not the server,
    decides what to write.)"""
    client = real_client
    await client.initialize_session(types.InitializeParams(capabilities=capabilities(),
                                                           initialization_options={"diagnosticsDelay": 60}))
    cases = [("        lines = read_lines", 11), ("    for name in argv", 10), ("    with open(", 5)]
    body = ("import os\nimport sys\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
            "        return f.read().splitlines()\n\n\ndef main(argv):\n    for name in argv:\n"
            "        lines = read_lines(\n")
    got = []
    for i, (typed, line) in enumerate(cases):
        lines = body.split("\n")
        lines[line] = typed
        text = "\n".join(lines)
        uri = uri_for(tmp_path, f"t{i}.py", text)
        open_doc(client, uri, text)
        res = await complete(client, uri, line, len(typed))
        for item in res.items:
            assert item.text_edit.range.end == types.Position(line, len(typed))
            assert "\n" not in item.text_edit.new_text  # mid-statement: one line
            got.append(item.text_edit.new_text)
    assert got, "the shipped model completed none of the three lines"
