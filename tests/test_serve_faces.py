"""The faces on a running server: assistant.remote.RemoteEngine, `moecoder lsp --server URL`,
`moecoder chat --server URL` (a tiny model served in a thread on loopback)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from assistant.protocols import Engine  # noqa: E402
from assistant.tasks import Explanation, TaskRequest  # noqa: E402
from tests.serve_support import running, script_reasoning  # noqa: E402

CODE = "def area(r):\n    return 3.14 * r * r\n"


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    from assistant.serving import Service

    s = Service(str(tiny_model_dir), max_batch=4, max_seconds=30)
    s.script = script_reasoning(s)
    yield s
    s.close()


@pytest.fixture(scope="module")
def url(service):
    with running(service) as u:
        yield u


def test_remote_engine_is_an_engine_and_matches_the_server_side(url, service):
    from assistant.remote import RemoteEngine

    remote = RemoteEngine(url)
    try:
        assert isinstance(remote, Engine)
        assert remote.context_length == service.context_length
        assert remote.count_tokens(CODE) == len(service.tokenizer.encode(CODE))  # the server's tokenizer
        req = TaskRequest("explain", CODE, line=0, end_line=1, max_new_tokens=12)
        events = list(remote.stream(req))
        kinds = [e.kind for e in events]
        assert kinds[-1] == "done" and kinds.index("answer") > kinds.index("reasoning")
        assert isinstance(events[-1].result, Explanation)
        assert events[-1].result == service.engine.run(req)  # the same result object as in-process
        bad = list(remote.stream(TaskRequest("comment", CODE, function="nope")))
        assert [e.kind for e in bad] == ["error"] and "nope" in bad[0].text
    finally:
        remote.close()


def test_lsp_server_flag_uses_the_running_server(url, service):
    import lsp.server
    from assistant.remote import RemoteEngine

    class Built(Exception):
        pass

    got = {}

    def build(factory, settings):
        server = lsp.server.build_server(factory, settings)
        got["engine"] = server.start_engine().result(timeout=60)  # what the LSP loads, as it loads it
        server.executor.shutdown(wait=False)
        raise Built

    with pytest.raises(Built):
        lsp.server.main(["--server", url], build=build)
    engine = got["engine"]
    assert isinstance(engine, RemoteEngine) and engine.url == url
    before = service.health["tokens"]
    res = engine.run(TaskRequest("complete", "def f(x):\n    return x\n", line=1, column=12, max_new_tokens=4))
    assert type(res).__name__ == "Completion" and service.health["tokens"] > before  # generated on the server
    assert lsp.server.main(["--server", "localhost:1"]) == 2


async def test_chat_server_flag_answers_through_the_server(url, service, tmp_path, monkeypatch):
    import tui.app
    from assistant.remote import RemoteEngine
    from tests.test_tui import last_done, turns, type_text, wait_for

    monkeypatch.setenv("MOECODER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "geo.py").write_text(CODE)
    apps = []
    monkeypatch.setattr(tui.app.ChatApp, "run", lambda self: apps.append(self))
    assert tui.app.main(["--server", url, "geo.py"]) == 0
    app = apps[0]
    before = service.health["tokens"]
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: isinstance(app._engine, RemoteEngine), timeout=60)
        await type_text(pilot, "what does area do")
        await pilot.press("enter")
        await wait_for(pilot, lambda: bool(turns(app)) and last_done(app)(), timeout=60)
        await asyncio.sleep(0)
        turn = turns(app)[-1]
        assert service.script["reasoning"].strip() in turn.state.reasoning
    assert service.health["tokens"] > before
    assert tui.app.main(["--server", "ftp://x"]) == 2
