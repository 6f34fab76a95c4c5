"""``python -m tests.lsp_fake_server [--agree TOKENIZER] [ARGS]``: ``moecoder lsp`` on a test engine.

The same ``lsp.server.main`` as the product, given a test engine: :class:`FakeEngine`, or
with ``--agree`` the in-process engine on ``tests.assistant_fakes.AgreeBackend`` (the
"faces agree" tests); and one extra command, ``moecoder.engineStats`` (the fake engine's
counters), that only the tests' server registers.
"""

from __future__ import annotations

import sys
from typing import Any

from lsp.server import EngineFactory, MoeServer, Settings, TaskFailed, build_server, main
from tests.lsp_fakes import FakeEngine


def build(factory: EngineFactory, settings: Settings) -> MoeServer:
    server = build_server(factory, settings)

    @server.command("moecoder.engineStats")
    async def engine_stats(ls: MoeServer, *args: Any) -> dict:
        try:
            eng = await ls.engine()
        except TaskFailed:
            return {}
        return eng.stats() if isinstance(eng, FakeEngine) else {}

    return server


def agree_factory(tokenizer: str):
    def make(model_dir: str | None = None, device: str | None = None):
        from assistant.engine import Engine
        from model.tokenizer import Tokenizer
        from tests.assistant_fakes import AgreeBackend

        return Engine.from_loaded(backend=AgreeBackend(Tokenizer.load(tokenizer)))

    return make


if __name__ == "__main__":
    argv = sys.argv[1:]
    factory = FakeEngine
    if argv[:1] == ["--agree"]:
        factory, argv = agree_factory(argv[1]), argv[2:]
    sys.exit(main(argv, factory=factory, build=build))
