"""One rule, every face: the review, the LSP and the chat give the same answer.

All three run on the in-process engine over ``AgreeBackend`` (a deterministic model that
flags two lines surely and one unsurely), at the same settings (no config file: the
default min-confidence 0.5).
"""

from __future__ import annotations

import asyncio
import re

from assistant_fakes import AGREE_SOURCE, AgreeBackend
from lsprotocol import types
from pytest_lsp import ClientServerConfig

from assistant.engine import Engine
from assistant.review import Report
from assistant.review import main as review_main
from tests.lsp_support import SERVER_CMD, capabilities, open_doc, server_env
from tests.test_tui import turns, wait_for
from tui.app import ChatApp

# (0-based line, message): the two sure hints; `a * b` (confidence 0.26) is dropped everywhere
EXPECTED = {(5, "`self.side - k` looks wrong"), (9, "`a - b` looks wrong")}


def review_hints(path, engine, capsys) -> set[tuple[int, str]]:
    code = review_main([str(path), "--format", "json", "--no-docstrings"], engine=engine)
    assert code == 1  # warnings found
    return {(f.line - 1, f.message) for f in Report.from_json(capsys.readouterr().out).findings}


async def lsp_hints(path, tokenizer_path) -> set[tuple[int, str]]:
    config = ClientServerConfig(server_command=[*SERVER_CMD, "--agree", str(tokenizer_path)],
                                server_env=server_env())
    client = await config.start()
    try:
        await client.initialize_session(types.InitializeParams(
            capabilities=capabilities(), initialization_options={"moecoder": {"diagnosticsDelay": 30}}))
        uri = path.as_uri()
        open_doc(client, uri, path.read_text())
        client.text_document_did_save(types.DidSaveTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri)))
        report = await asyncio.wait_for(client.text_document_diagnostic_async(types.DocumentDiagnosticParams(
            text_document=types.TextDocumentIdentifier(uri=uri))), 120)
        assert all(d.severity == types.DiagnosticSeverity.Warning for d in report.items)
        return {(d.range.start.line, d.message.split(" (confidence")[0]) for d in report.items}
    finally:
        await client.shutdown_session()
        await client.stop()


async def chat_answer(tmp_path, engine, command: str) -> str:
    app = ChatApp(engine=engine, data_dir=tmp_path / "data", cwd=tmp_path, clock=lambda: 1_700_000_000.0)
    async with app.run_test(size=(100, 40)) as pilot:
        await app.handle_input("/add shapes.py")
        await app.handle_input(command)
        await wait_for(pilot, lambda: bool(turns(app)) and turns(app)[-1].settled, timeout=120)
        return turns(app)[-1].state.answer


def chat_hints(answer: str) -> set[tuple[int, str]]:
    return {(int(m.group(1)) - 1, m.group(2)) for m in re.finditer(r"\*\*line (\d+) in `[\w.]+`\*\*.*?: (.+)", answer)}


async def test_the_same_file_gives_the_same_hints_in_review_lsp_and_chat(tmp_path, tiny_tokenizer,
                                                                         tiny_tokenizer_path, capsys, monkeypatch):
    monkeypatch.setenv("MOECODER_CONFIG", str(tmp_path / "no-config.toml"))
    path = tmp_path / "shapes.py"
    path.write_text(AGREE_SOURCE)
    with Engine.from_loaded(backend=AgreeBackend(tiny_tokenizer)) as engine:
        review = review_hints(path, engine, capsys)
        chat = chat_hints(await chat_answer(tmp_path, engine, "/debug"))
    lsp = await lsp_hints(path, tiny_tokenizer_path)
    assert review == lsp == chat == EXPECTED


async def test_comment_class_method_in_the_chat(tmp_path, tiny_tokenizer):
    (tmp_path / "shapes.py").write_text(AGREE_SOURCE)
    with Engine.from_loaded(backend=AgreeBackend(tiny_tokenizer)) as engine:
        answer = await chat_answer(tmp_path, engine, "/comment Shape.scale")
    assert "Docstring for `Shape.scale`" in answer and "Scale the shape." in answer


async def test_free_text_reaches_the_model(tmp_path, tiny_tokenizer):
    (tmp_path / "shapes.py").write_text(AGREE_SOURCE)
    backend = AgreeBackend(tiny_tokenizer)
    app = ChatApp(engine=Engine.from_loaded(backend=backend), data_dir=tmp_path / "data", cwd=tmp_path)
    async with app.run_test(size=(100, 40)) as pilot:
        await app.handle_input("/add shapes.py")
        await app.handle_input("what does Shape.scale return for negative sides?")
        await wait_for(pilot, lambda: bool(turns(app)) and turns(app)[-1].settled, timeout=120)
        assert turns(app)[-1].state.task == "explain"
    prompt = tiny_tokenizer.decode(backend.prompts[-1])
    assert "# Question: what does Shape.scale return for negative sides?" in prompt
    assert "def scale(self, k):" in prompt and "def add" not in prompt  # the method it named
