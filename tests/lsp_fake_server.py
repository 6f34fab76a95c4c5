"""``python -m tests.lsp_fake_server [ARGS]``: ``moecoder lsp`` on the scripted engine.

The same ``lsp.server.main`` as the product, given the test engine (:class:`FakeEngine`)
and one extra command, ``moecoder.engineStats`` (the engine's counters), that only the
tests' server registers.
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
        assert isinstance(eng, FakeEngine)
        return eng.stats()

    return server


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], factory=FakeEngine, build=build))
