"""End-to-end tests of the language server over stdio (pytest-lsp), on the scripted engine.

The scripted engine (tests.lsp_fakes.FakeEngine, served by tests.lsp_fake_server) echoes the cursor it was given, so position
conversion is checked exactly; FAKE_DELAY makes a request slow without timing races.
"""

from __future__ import annotations

import ast
import asyncio

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from tests.lsp_support import (
    SERVER_CMD,
    apply_edits,
    capabilities,
    change_doc,
    complete,
    edits_of,
    inline,
    open_doc,
    raw_request,
    send_raw_request,
    server_env,
    stats,
    uri_for,
)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER_CMD, server_env=server_env()))
async def client(lsp_client: LanguageClient):
    yield
    await lsp_client.shutdown_session()


async def init(client: LanguageClient, caps=None, options=None) -> types.InitializeResult:
    return await client.initialize_session(types.InitializeParams(
        capabilities=caps or capabilities(), initialization_options=options))


async def test_initialize_advertises_what_the_client_supports(client: LanguageClient):
    result = await init(client, capabilities(inline=True))
    caps = result.capabilities
    assert caps.completion_provider is not None
    assert caps.inline_completion_provider is not None
    assert caps.code_action_provider.resolve_provider is True
    assert caps.diagnostic_provider is not None  # neovim 0.10 pulls diagnostics
    assert caps.hover_provider is None  # off by default: not advertised, the editor's own hover (K) stays
    assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
    assert caps.position_encoding == types.PositionEncodingKind.Utf16
    assert result.server_info.name == "moecoder"


async def test_hover_is_advertised_when_switched_on_at_initialize(client: LanguageClient):
    result = await init(client, options={"features": {"hover": True}})
    assert result.capabilities.hover_provider


async def test_no_inline_completion_or_pull_for_an_older_client(client: LanguageClient):
    result = await init(client, capabilities("neovim@v0.9.1", inline=False))
    assert result.capabilities.inline_completion_provider is None
    assert result.capabilities.diagnostic_provider is None


async def test_no_pull_without_refresh_support(client: LanguageClient):
    result = await init(client, capabilities("neovim@v0.10.0", refresh=False))
    assert result.capabilities.diagnostic_provider is None  # hints are pushed instead


async def test_completion_single_line_mid_line_with_utf16_positions(client: LanguageClient, tmp_path):
    # the emoji are outside the BMP: 2 UTF-16 units each, 1 Python character each
    text = 's = "😀😀"\nx = foo(ab) + s\n'
    uri = uri_for(tmp_path, "a.py", text)
    await init(client)
    open_doc(client, uri, text)
    # cursor after "ab" on line 1 (ASCII line): character 10
    res = await complete(client, uri, 1, 10)
    assert len(res.items) == 1
    item = res.items[0]
    assert item.text_edit.new_text == "abdone_L1_C10"  # single line: text after the cursor on the line
    assert item.text_edit.range.start == types.Position(1, 8)  # the word "ab" is replaced with itself + text
    assert item.text_edit.range.end == types.Position(1, 10)
    # cursor on line 0 just before the closing quote: UTF-16 character 7 == Python column 6
    res = await complete(client, uri, 0, 7)
    assert res.items[0].text_edit.new_text == "done_L0_C6"
    assert res.items[0].text_edit.range.start == types.Position(0, 7)


async def test_utf8_position_encoding_is_negotiated(client: LanguageClient, tmp_path):
    text = 's = "é😀"\n'
    uri = uri_for(tmp_path, "u8.py", text)
    result = await init(client, capabilities(encodings=["utf-8", "utf-16"]))
    assert result.capabilities.position_encoding == types.PositionEncodingKind.Utf8
    open_doc(client, uri, text)
    # before the closing quote: bytes 's = "' (5) + é (2) + 😀 (4) = 11; Python column 7
    res = await complete(client, uri, 0, 11)
    assert res.items[0].text_edit.new_text == "done_L0_C7"
    assert res.items[0].text_edit.range.start == types.Position(0, 11)


async def test_multiline_completion_at_end_of_line_and_inline(client: LanguageClient, tmp_path):
    text = "def f(x):\n    \n"
    uri = uri_for(tmp_path, "m.py", text)
    await init(client)
    open_doc(client, uri, text)
    res = await complete(client, uri, 1, 4)
    assert res.items[0].text_edit.new_text == "done_L1_C4\nsecond_line"
    inl = await inline(client, uri, 1, 4)
    assert [i.insert_text for i in inl.items] == ["done_L1_C4\nsecond_line"]
    assert inl.items[0].range.start == inl.items[0].range.end == types.Position(1, 4)


async def test_completion_and_inline_at_one_cursor_share_one_engine_job(client: LanguageClient, tmp_path):
    text = "# FAKE_DELAY=0.5\nx = 1\n"
    uri = uri_for(tmp_path, "share.py", text)
    await init(client)
    open_doc(client, uri, text)
    res, inl = await asyncio.gather(complete(client, uri, 1, 5), inline(client, uri, 1, 5))
    assert res.items[0].text_edit.new_text == "1done_L1_C5\nsecond_line"
    assert inl.items[0].insert_text == "done_L1_C5\nsecond_line"
    assert (await stats(client))["started"] == 1


async def test_incremental_changes_are_applied(client: LanguageClient, tmp_path):
    text = "a = 1\nb = 2\n"
    uri = uri_for(tmp_path, "c.py", text)
    await init(client)
    open_doc(client, uri, text)
    change_doc(client, uri, 2, (1, 0), (1, 0), "# 😀 FAKE_WORD=edited\n")  # insert a line
    change_doc(client, uri, 3, (2, 4), (2, 5), "22")  # b = 2 -> b = 22
    res = await complete(client, uri, 2, 6)
    assert res.items[0].text_edit.new_text == "22edited_L2_C6\nsecond_line"


async def test_code_action_docstring_resolves_to_a_valid_edit(client: LanguageClient, tmp_path):
    text = "import os\n\n\ndef area(w, h):\n    return w * h\n"
    uri = uri_for(tmp_path, "d.py", text)
    await init(client, options={"diagnosticsDelay": 60})  # no hint jobs in the counts below
    open_doc(client, uri, text)
    actions = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=types.Range(start=types.Position(4, 6), end=types.Position(4, 6)),
        context=types.CodeActionContext(diagnostics=[])))
    doc_actions = [a for a in actions if a.title.startswith("Add docstring")]
    assert len(doc_actions) == 1
    assert doc_actions[0].edit is None  # computed lazily, in resolve
    assert (await stats(client))["started"] == 0
    resolved = await client.code_action_resolve_async(doc_actions[0])
    # $/progress: begin (titled) ... end, on a server-created token (Neovim has workDoneProgress)
    reports = [r for r in client.progress_reports.values()
               if r and isinstance(r[0], types.WorkDoneProgressBegin) and "docstring for area" in r[0].title]
    assert len(reports) == 1 and isinstance(reports[0][-1], types.WorkDoneProgressEnd)
    edits = edits_of(resolved.edit, uri)
    new = apply_edits(text, edits)
    assert new == 'import os\n\n\ndef area(w, h):\n    """Fake docstring for area."""\n    return w * h\n'
    ast.parse(new)
    tree = ast.parse(new)
    assert ast.get_docstring(tree.body[1]) == "Fake docstring for area."
    # a function that already has a docstring gets no action
    open_doc(client, uri + "2.py", new)
    actions = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri + "2.py"),
        range=types.Range(start=types.Position(5, 6), end=types.Position(5, 6)),
        context=types.CodeActionContext(diagnostics=[])))
    assert not [a for a in actions or [] if a.title.startswith("Add docstring")]


async def test_pull_diagnostics_with_result_ids_and_apply_fix(client: LanguageClient, tmp_path):
    text = "def f(x):\n    y = x + FAKE_BUG\n    return y\n"
    uri = uri_for(tmp_path, "e.py", text)
    await init(client, options={"moecoder": {"diagnosticsDelay": 30}})
    open_doc(client, uri, text)
    assert (await stats(client))["started"] == 0  # not computed on open/keystrokes (30 s idle here)
    client.text_document_did_save(types.DidSaveTextDocumentParams(text_document=types.TextDocumentIdentifier(uri)))
    report = await client.text_document_diagnostic_async(types.DocumentDiagnosticParams(
        text_document=types.TextDocumentIdentifier(uri=uri)))
    assert report.kind == "full" and report.result_id
    (d,) = report.items
    assert d.range.start == types.Position(1, 4) and d.range.end == types.Position(1, 20)
    assert d.severity == types.DiagnosticSeverity.Warning  # confidence 0.8
    assert d.source == "moecoder"
    reasoning = " ".join(r.message for r in d.related_information or []) + d.message
    assert "the marker FAKE_BUG is never defined" in reasoning
    again = await client.text_document_diagnostic_async(types.DocumentDiagnosticParams(
        text_document=types.TextDocumentIdentifier(uri=uri), previous_result_id=report.result_id))
    assert again.kind == "unchanged" and again.result_id == report.result_id
    actions = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), range=d.range,
        context=types.CodeActionContext(diagnostics=[d], only=[types.CodeActionKind.QuickFix])))
    (fix,) = actions
    assert fix.kind == types.CodeActionKind.QuickFix
    assert apply_edits(text, edits_of(fix.edit, uri)) == "def f(x):\n    y = x + fixed\n    return y\n"


async def test_diagnostics_rerun_only_changed_functions(client: LanguageClient, tmp_path):
    text = "def f(x):\n    return x + FAKE_BUG\n\n\ndef g(y):\n    return y\n"
    uri = uri_for(tmp_path, "two.py", text)
    await init(client, options={"diagnosticsDelay": 30})
    open_doc(client, uri, text)

    async def save_and_pull() -> list[types.Diagnostic]:
        client.text_document_did_save(types.DidSaveTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri)))
        report = await client.text_document_diagnostic_async(types.DocumentDiagnosticParams(
            text_document=types.TextDocumentIdentifier(uri=uri)))
        return list(report.items)

    async def debug_requests() -> list:
        return [r for r in (await stats(client))["requests"] if r[0] == "debug"]

    (d,) = await save_and_pull()
    assert d.range.start.line == 1
    assert [r[1] for r in await debug_requests()] == [0, 4]  # one request per function
    change_doc(client, uri, 2, (0, 0), (0, 0), "import os\n")  # both functions move, unchanged
    (d,) = await save_and_pull()
    assert d.range.start.line == 2  # the cached hint moved with its function
    assert len(await debug_requests()) == 2
    change_doc(client, uri, 3, (6, 11), (6, 12), "y + 1")  # g changes
    (d,) = await save_and_pull()
    assert [r[1] for r in await debug_requests()] == [0, 4, 5]  # only g again


async def test_completion_preempts_running_hint_computation(client: LanguageClient, tmp_path):
    text = "# FAKE_DELAY_DEBUG=30\ndef f(x):\n    return x + FAKE_BUG\n"
    uri = uri_for(tmp_path, "pre.py", text)
    await init(client, options={"diagnosticsDelay": 30})
    open_doc(client, uri, text)
    client.text_document_did_save(types.DidSaveTextDocumentParams(text_document=types.TextDocumentIdentifier(uri)))
    for _ in range(200):
        if (await stats(client))["started"] == 1:
            break
        await asyncio.sleep(0.02)
    res = await complete(client, uri, 2, 8)
    assert res.items[0].text_edit.new_text == "retudone_L2_C8"
    for _ in range(200):  # the hint job stops within a token of being cancelled
        s = await stats(client)
        if s["cancelled"] == 1:
            break
        await asyncio.sleep(0.05)
    assert [r[0] for r in s["requests"]] == ["debug", "complete"] and s["cancelled"] == 1


async def test_push_diagnostics_for_a_client_without_pull(client: LanguageClient, tmp_path):
    text = "def f(x):\n    return FAKE_BUG\n"
    uri = uri_for(tmp_path, "p.py", text)
    await init(client, capabilities("emacs", inline=False), options={"diagnosticsDelay": 0.2})
    open_doc(client, uri, text)
    await asyncio.wait_for(client.wait_for_notification(types.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS), 20)
    (d,) = client.diagnostics[uri]
    assert d.range.start.line == 1
    assert "Reasoning: the marker FAKE_BUG" in d.message or d.related_information


async def test_cancel_a_slow_request_cancels_the_engine(client: LanguageClient, tmp_path):
    text = "# FAKE_DELAY=30\nx = 1\n"
    uri = uri_for(tmp_path, "s.py", text)
    await init(client)
    open_doc(client, uri, text)
    msg_id, fut = send_raw_request(client, types.TEXT_DOCUMENT_COMPLETION, types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(1, 5)))
    for _ in range(200):  # wait until the engine has started it
        if (await stats(client))["started"] == 1:
            break
        await asyncio.sleep(0.05)
    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
    with pytest.raises(Exception, match="cancel"):
        await asyncio.wait_for(fut, 10)
    for _ in range(200):
        if (await stats(client))["cancelled"] == 1:
            break
        await asyncio.sleep(0.05)
    assert (await stats(client))["cancelled"] == 1
    # and the server still serves
    change_doc(client, uri, 2, (0, 0), (1, 0), "")
    res = await complete(client, uri, 0, 5)
    assert res.items[0].text_edit.new_text == "1done_L0_C5\nsecond_line"


async def test_stale_version_result_is_dropped(client: LanguageClient, tmp_path):
    text = "# FAKE_DELAY=3.0\nx = 1\n"
    uri = uri_for(tmp_path, "v.py", text)
    await init(client)
    open_doc(client, uri, text)
    task = asyncio.ensure_future(complete(client, uri, 1, 5))
    for _ in range(200):
        if (await stats(client))["started"] == 1:
            break
        await asyncio.sleep(0.02)
    change_doc(client, uri, 2, (1, 5), (1, 5), "2")
    res = await asyncio.wait_for(task, 20)
    assert res.items == ()
    s = await stats(client)
    assert s["finished"] == 1 and s["cancelled"] == 0  # computed, then dropped as stale


async def test_newer_completion_supersedes_older(client: LanguageClient, tmp_path):
    text = "# FAKE_PREFILL=2.5\nx = 1\ny = 2\n"
    uri = uri_for(tmp_path, "n.py", text)
    await init(client)
    open_doc(client, uri, text)
    first = asyncio.ensure_future(complete(client, uri, 1, 5))
    for _ in range(200):
        if (await stats(client))["started"] == 1:
            break
        await asyncio.sleep(0.02)
    # the first is in its (uninterruptible) prefill: the middle request waits for it and is
    # superseded by the last one before it reaches the engine
    middle = asyncio.ensure_future(complete(client, uri, 1, 3))
    await asyncio.sleep(0.2)
    second = await complete(client, uri, 2, 5)
    assert second.items[0].text_edit.new_text == "2done_L2_C5\nsecond_line"
    assert (await first).items == () and (await middle).items == ()
    s = await stats(client)
    assert s["cancelled"] == 1  # the first, stopped in the engine
    assert [r[1:3] for r in s["requests"]] == [[1, 5], [2, 5]]  # the middle one never reached it


async def test_hover_is_off_by_default_then_reasoning_first(client: LanguageClient, tmp_path):
    text = "def f(x):\n    return x + 1\n"
    uri = uri_for(tmp_path, "h.py", text)
    await init(client)
    open_doc(client, uri, text)
    params = types.HoverParams(text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(1, 8))
    assert await client.text_document_hover_async(params) is None
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"moecoder": {"features": {"hover": True}}}))
    hover = await client.text_document_hover_async(params)
    value = hover.contents.value
    assert value.index("read the code first") < value.index("Explains lines 0-1.")
    # the pull model: empty settings in didChangeConfiguration -> workspace/configuration
    client.set_configuration({"features": {"hover": False}}, section="moecoder")
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=None))
    for _ in range(100):
        if await client.text_document_hover_async(params) is None:
            break
        await asyncio.sleep(0.05)
    assert await client.text_document_hover_async(params) is None


async def test_changing_the_model_path_reloads_the_engine(client: LanguageClient, tmp_path):
    text = "x = 1\n"
    uri = uri_for(tmp_path, "r.py", text)
    await init(client)
    open_doc(client, uri, text)
    assert (await complete(client, uri, 0, 5)).items
    before = await stats(client)
    assert before["model_dir"] is None and before["started"] == 1
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"moecoder": {"modelPath": str(tmp_path)}}))
    after = await stats(client)
    assert after["model_dir"] == str(tmp_path) and after["started"] == 0  # a new engine
    assert (await complete(client, uri, 0, 5)).items
    assert (await stats(client))["started"] == 1  # computed by the new engine, not reused


async def test_bad_settings_are_reported_and_ignored(client: LanguageClient, tmp_path):
    await init(client, options={"maxTokens": "many", "features": {"hover": 3, "teleport": True}})
    text = "x = 1\n"
    uri = uri_for(tmp_path, "k.py", text)
    open_doc(client, uri, text)
    assert (await complete(client, uri, 0, 3)).items  # still serving with defaults
    messages = " | ".join(m.message for m in client.messages)
    assert "maxTokens must be a number" in messages
    assert "features.hover must be true or false" in messages
    assert "unknown feature 'teleport'" in messages


async def test_bad_requests_get_empty_results_or_errors(client: LanguageClient, tmp_path):
    await init(client)
    # unopened document
    res = await complete(client, "file:///nowhere/never_opened.py", 0, 0)
    assert res.items == ()
    # non-Python document
    uri_txt = uri_for(tmp_path, "notes.txt", "hello world\n")
    open_doc(client, uri_txt, "hello world\n", language="plaintext")
    assert (await complete(client, uri_txt, 0, 5)).items == ()
    # invalid positions: past the last line, past the line end (clamped)
    text = "x = 1\n"
    uri = uri_for(tmp_path, "b.py", text)
    open_doc(client, uri, text)
    assert (await complete(client, uri, 10**6, 0)).items == ()
    res = await complete(client, uri, 0, 10**6)
    assert res.items[0].text_edit.new_text.startswith("1done_L0_C5")  # clamped to the line end
    # unknown method: a JSON-RPC error, not a crash
    with pytest.raises(Exception, match="[Mm]ethod"):
        await asyncio.wait_for(raw_request(client, "moecoder/noSuchMethod", {}), 10)
    # wrong params: an InvalidParams error response
    with pytest.raises(Exception, match="[Ii]nvalid"):
        await asyncio.wait_for(raw_request(client, types.TEXT_DOCUMENT_COMPLETION, {"textDocument": 5}), 10)
    # a 100,000-line document: completion still answers, diagnostics are skipped
    big = "".join(f"v{i} = {i}\n" for i in range(100_000))
    uri_big = uri_for(tmp_path, "big.py", big)
    open_doc(client, uri_big, big)
    res = await complete(client, uri_big, 99_999, 3)
    # the engine got the document and the prompt cap (contextTokens): assistant.context cuts
    # the window, once for every face (tests/test_context.py: a 100,000-line file)
    assert res.items[0].text_edit.new_text == "v99done_L99999_C3"  # the word before the cursor + the answer
    assert (await stats(client))["requests"][-1] == ["complete", 99_999, 3, 512]
    report = await client.text_document_diagnostic_async(types.DocumentDiagnosticParams(
        text_document=types.TextDocumentIdentifier(uri=uri_big)))
    assert report.items == ()
    # still serving
    assert (await complete(client, uri, 0, 5)).items


async def test_shutdown_and_exit(client: LanguageClient, tmp_path):
    await init(client)
    text = "# FAKE_DELAY=60\nx = 1\n"
    uri = uri_for(tmp_path, "slow.py", text)
    open_doc(client, uri, text)
    slow = asyncio.ensure_future(complete(client, uri, 1, 5))  # still running at shutdown
    for _ in range(200):
        if (await stats(client))["started"] == 1:
            break
        await asyncio.sleep(0.02)
    await client.shutdown_async(None)
    client.exit(None)
    await asyncio.wait_for(client._server.wait(), 20)
    assert client._server.returncode == 0
    slow.cancel()
    client.capabilities = None  # the fixture's teardown must not shut down twice


async def test_find_the_bug_runs_the_examples_and_offers_the_verified_fix(client: LanguageClient, tmp_path):
    text = ('def count_below(items, limit):\n'
            '    """How many items are at most ``limit``.\n\n'
            '    >>> count_below([1, 2, 3], 2)\n    2\n    >>> count_below([5], 1)\n    0\n'
            '    >>> count_below([3, 2], 2)\n    1\n    """\n'
            '    n = 0\n    for x in items:\n        if x < limit:\n            n += 1\n    return n\n')
    uri = uri_for(tmp_path, "b.py", text)
    await init(client, options={"diagnosticsDelay": 60})
    open_doc(client, uri, text)
    actions = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=types.Range(start=types.Position(12, 8), end=types.Position(12, 8)),
        context=types.CodeActionContext(diagnostics=[])))
    find = [a for a in actions if a.title.startswith("Find the bug (runs examples)")]
    assert len(find) == 1 and getattr(find[0], "edit", None) is None  # nothing runs until the user picks it
    assert (await stats(client))["started"] == 0
    cmd = find[0].command  # a CodeAction's command (a bare Command when the client reads it so)
    name, args = (cmd.command, cmd.arguments) if isinstance(cmd, types.Command) else (cmd, find[0].arguments)
    if isinstance(name, str) and name.startswith("{"):  # pytest-lsp reads the union as a Command
        name = ast.literal_eval(name)
    if isinstance(name, dict):
        name, args = name["command"], name["arguments"]
    assert name == "moecoder.findBug"
    result = await client.workspace_execute_command_async(types.ExecuteCommandParams(command=name, arguments=args))
    (h,) = result["hints"]
    assert h["evidence"] == "verified" and h["line"] == 12 and h["fix"] == "        if x <= limit:"
    assert "returned 1, the docstring expects 2" in result["reasoning"]
    # the verified fix is now a diagnostic with a quick fix
    actions = await client.text_document_code_action_async(types.CodeActionParams(
        text_document=types.TextDocumentIdentifier(uri=uri),
        range=types.Range(start=types.Position(12, 8), end=types.Position(12, 8)),
        context=types.CodeActionContext(diagnostics=[])))
    fixes = [a for a in actions if a.title.startswith("Apply fix")]
    assert fixes and apply_edits(text, edits_of(fixes[0].edit, uri)).split("\n")[12] == "        if x <= limit:"


async def test_inline_item_replaces_the_rest_of_the_line(client: LanguageClient, tmp_path):
    """Code after the cursor: the inline item's range runs to the end of the line and its text
    carries that code, so the editor does not draw the suggestion over it."""
    from lsp.server import closing_overlap

    text = "y = max()  # two\n"
    uri = uri_for(tmp_path, "r.py", text)
    await init(client, capabilities(inline=True))
    open_doc(client, uri, text)
    inl = await inline(client, uri, 0, 8)
    item = inl.items[0]
    assert item.insert_text == "done_L0_C8)  # two"
    assert item.range.start == types.Position(0, 8) and item.range.end == types.Position(0, 16)
    # a one-line completion that also closes the bracket does not double it
    assert closing_overlap("a, b)", ")  # two") == 1 and closing_overlap("a, b", ")") == 0
    assert closing_overlap("f(x))", "))") == 2


async def _reads_after(client: LanguageClient, n: int, timeout: float = 15.0) -> list:
    end = asyncio.get_running_loop().time() + timeout
    while True:
        got = (await stats(client))["reads"]
        if len(got) >= n or asyncio.get_running_loop().time() > end:
            return got
        await asyncio.sleep(0.1)


async def test_the_workspace_is_read_into_the_memory_while_idle(client: LanguageClient, tmp_path):
    """repositoryContext (on by default): the server reads the workspace into the completion memory
    a slice at a time, only after IDLE_READ_AFTER_S without requests or edits, until the engine says
    it is complete; completions carry the workspace and never read themselves (repo_read_s < 0)."""
    from lsp import server as srv

    await client.initialize_session(types.InitializeParams(capabilities=capabilities(), root_uri=tmp_path.as_uri()))
    uri = uri_for(tmp_path, "a.py", "value = 1\n")
    open_doc(client, uri, "value = 1\n")
    for v in range(2, 8):  # typing: an edit every 0.4 s keeps the reader waiting
        await asyncio.sleep(0.4)
        change_doc(client, uri, v, (0, 8), (0, 9), str(v))
    assert (await stats(client))["reads"] == []
    reads = await _reads_after(client, 3)
    assert len(reads) == 3 and all(r[0] == str(tmp_path) and r[1] == srv.READ_SLICE_S for r in reads)
    assert reads[0][2] >= reads[-1][2] - 5.0  # the slices follow each other while idle
    await complete(client, uri, 0, 9)
    s = await stats(client)
    assert s["repo"][-1] == [str(tmp_path), srv.REPO_READ_S] and srv.REPO_READ_S < 0
    await asyncio.sleep(0.5)
    assert len((await stats(client))["reads"]) == 3  # complete: the next look is RECHECK_S later
    # $/progress while it was read: begin, the files so far after each slice, end once complete
    reports = [r for r in client.progress_reports.values()
               if r and isinstance(r[0], types.WorkDoneProgressBegin) and "reading the workspace" in r[0].title]
    assert len(reports) == 1 and isinstance(reports[0][-1], types.WorkDoneProgressEnd)
    assert [m.message for m in reports[0][1:-1]] == ["1 files, 10 positions", "2 files, 20 positions",
                                                     "3 files, 30 positions"]


async def test_no_workspace_reading_when_repository_context_is_off(client: LanguageClient, tmp_path):
    await client.initialize_session(types.InitializeParams(capabilities=capabilities(), root_uri=tmp_path.as_uri(),
                                                           initialization_options={"repositoryContext": False}))
    uri = uri_for(tmp_path, "a.py", "value = 1\n")
    open_doc(client, uri, "value = 1\n")
    await asyncio.sleep(2.8)
    await complete(client, uri, 0, 9)
    s = await stats(client)
    assert s["reads"] == [] and s["repo"][-1] == [None, None]
