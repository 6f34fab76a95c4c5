"""Snapshots of the chat screen (pytest-textual-snapshot), 80x24, scripted engine.

Update after an intended visual change: ``pytest tests/test_tui_snapshots.py --snapshot-update``
and look at the SVGs in tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

import asyncio

from tests.tui_fakes import ScriptedEngine
from tui.app import ChatApp
from tui.widgets import AssistantTurn

SIZE = (80, 24)
CALC = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"


def make_app(tmp_path) -> ChatApp:
    (tmp_path / "calc.py").write_text(CALC)
    return ChatApp(
        engine=ScriptedEngine(delay=0.0),
        data_dir=tmp_path / "data",
        cwd=tmp_path,
        clock=lambda: 1_700_000_000.0,
    )


async def settle(pilot, predicate) -> None:
    for _ in range(500):
        if predicate():
            break
        await pilot.pause(0.02)
    await pilot.pause()


def test_main_screen(snap_compare, tmp_path):
    async def run_before(pilot) -> None:
        await pilot.pause()

    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_streamed_answer_with_folded_reasoning(snap_compare, tmp_path):
    app = make_app(tmp_path)

    async def run_before(pilot) -> None:
        await pilot.pause()
        await app.handle_input("what does this do?")
        await settle(pilot, lambda: app.query(AssistantTurn) and app.query_one(AssistantTurn).settled)
        await asyncio.sleep(0.05)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_attachments_panel(snap_compare, tmp_path):
    app = make_app(tmp_path)

    async def run_before(pilot) -> None:
        await pilot.pause()
        await app.handle_input("/add calc.py")
        await settle(pilot, lambda: "Context budget" in str(app.query_one("#budget").render()))

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_light_theme(snap_compare, tmp_path):
    """Colours come from the theme: the same screen under textual-light."""
    app = make_app(tmp_path)

    async def run_before(pilot) -> None:
        app.theme = "textual-light"
        await pilot.pause()
        await app.handle_input("/add calc.py")
        await app.handle_input("what does this do?")
        await settle(pilot, lambda: app.query(AssistantTurn) and app.query_one(AssistantTurn).settled)
        await settle(pilot, lambda: "Context budget" in str(app.query_one("#budget").render()))

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
