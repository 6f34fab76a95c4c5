"""Benchmarks of the chat UI (headless): `python -m tests.tui_bench [--model DIR]`.

Measures what the user feels, not the model: how many engine events per second the
screen absorbs (reasoning + Markdown answer streaming), how long Escape takes to mark a
turn stopped and to reach the engine, startup time, and the longest stall of the UI
event loop (a 20 ms ticker; its largest gap) while a model loads and while it answers.
With ``--model DIR`` the load and an answer use the real engine on that checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.tui_fakes import ScriptedEngine
from tui.app import ChatApp
from tui.widgets import AssistantTurn

SIZE = (80, 24)


class Ticker:
    """Largest gap between 20 ms ticks of the UI loop: a stall shows as a long gap."""

    def __init__(self, app: ChatApp) -> None:
        self.last = time.perf_counter()
        self.max_gap = 0.0
        app.set_interval(0.02, self.tick)

    def tick(self) -> None:
        now = time.perf_counter()
        self.max_gap = max(self.max_gap, now - self.last)
        self.last = now

    def reset(self) -> None:
        self.last = time.perf_counter()
        self.max_gap = 0.0


async def until(pilot, predicate, timeout: float = 120.0) -> None:
    end = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > end:
            raise TimeoutError("benchmark step did not finish")
        await pilot.pause(0.005)


def done(app: ChatApp):
    return lambda: bool(app.query(AssistantTurn)) and app.query(AssistantTurn).last().settled


async def bench_stream(tmp: Path, reasoning_chunks: int, answer_chunks: int, delay: float) -> dict:
    reasoning = ["thinking about it "] * reasoning_chunks
    answer = []
    for i in range(answer_chunks):
        answer.append(f"word{i} " if i % 12 else "\n\n```python\nx = 1\n```\n\nMore text ")
    engine = ScriptedEngine(reasoning=reasoning, answer=answer, delay=delay)
    app = ChatApp(engine=engine, data_dir=tmp / "data", cwd=tmp)
    engine_end: list[float] = []

    def finished() -> bool:
        if engine.finished.is_set() and not engine_end:
            engine_end.append(time.perf_counter())
        return done(app)()

    async with app.run_test(size=SIZE) as pilot:
        ticker = Ticker(app)
        await pilot.pause()
        ticker.reset()
        t0 = time.perf_counter()
        await app.handle_input("stream please")
        await until(pilot, finished)
        t1 = time.perf_counter()
    n = reasoning_chunks + answer_chunks
    lag = (t1 - engine_end[0]) * 1e3 if engine_end else float("nan")
    return {
        "events": n,
        "seconds": t1 - t0,
        "events_per_s": n / (t1 - t0),
        "lag_ms": lag,
        "max_ui_gap_ms": ticker.max_gap * 1e3,
    }


async def bench_escape(tmp: Path, repeats: int) -> dict:
    ui, engine_ms = [], []
    engine = ScriptedEngine(delay=0.0, hold_after=2)
    app = ChatApp(engine=engine, data_dir=tmp / "data", cwd=tmp)
    async with app.run_test(size=SIZE) as pilot:
        for _ in range(repeats):
            await app.handle_input("go")
            await until(pilot, engine.holding.is_set)
            t0 = time.perf_counter()
            app.action_stop()  # what the Escape binding runs (Pilot's key delivery adds ~80 ms of its own)
            ui.append((time.perf_counter() - t0) * 1e3)
            await until(pilot, engine.finished.is_set)
            engine_ms.append((time.perf_counter() - t0) * 1e3)
            await pilot.pause()
    return {"ui_ms": statistics.median(ui), "engine_ms": statistics.median(engine_ms), "n": repeats}


async def bench_startup(tmp: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        app = ChatApp(engine=ScriptedEngine(delay=0.0), data_dir=tmp / "data", cwd=tmp)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


async def bench_model(tmp: Path, model_dir: str, max_new_tokens: int) -> dict:
    from tui import api

    (tmp / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    app = ChatApp(
        engine_factory=api.load_engine,
        model_dir=model_dir,
        data_dir=tmp / "data",
        cwd=tmp,
        files=["calc.py"],
        max_new_tokens=max_new_tokens,
    )
    out = {}
    async with app.run_test(size=SIZE) as pilot:
        ticker = Ticker(app)
        t0 = time.perf_counter()
        await until(pilot, lambda: app._engine is not None or "no model" in app.sub_title)
        out["load_s"] = time.perf_counter() - t0
        out["load_max_ui_gap_ms"] = ticker.max_gap * 1e3
        if app._engine is None:
            raise SystemExit(f"tests.tui_bench: could not load {model_dir}")
        await pilot.pause(0.2)
        ticker.reset()
        t0 = time.perf_counter()
        await app.handle_input("/debug add")
        await until(pilot, done(app))
        out["answer_s"] = time.perf_counter() - t0
        out["answer_max_ui_gap_ms"] = ticker.max_gap * 1e3
        out["answer_status"] = app.query(AssistantTurn).last().state.status
    return out


def header() -> str:
    import textual

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.platform()} | "
        f"python {platform.python_version()} | textual {textual.__version__} | "
        f"cpus {os.cpu_count()} | load average {load}"
    )


async def run(args: argparse.Namespace) -> None:
    print(header())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ms = await bench_startup(tmp, 3)
        print(f"startup to first screen (headless, median of 3): {ms:.0f} ms")
        for r, a, delay in [(50, 200, 0.0), (200, 1000, 0.0), (100, 400, 0.01)]:
            s = await bench_stream(tmp, r, a, delay)
            pace = "as fast as possible" if delay == 0 else f"engine paced at {1 / delay:.0f} events/s"
            print(
                f"stream {s['events']:>5} events ({pace}): {s['seconds']:.2f} s, "
                f"{s['events_per_s']:,.0f} events/s shown, screen done {s['lag_ms']:.0f} ms after the engine, "
                f"longest UI stall {s['max_ui_gap_ms']:.0f} ms"
            )
        e = await bench_escape(tmp, 5)
        print(
            f"Esc action -> turn marked stopped: {e['ui_ms']:.2f} ms; -> engine stream ended: "
            f"{e['engine_ms']:.1f} ms (median of {e['n']})"
        )
        if args.model:
            m = await bench_model(tmp, args.model, args.max_new_tokens)
            print(
                f"real engine {args.model}: load {m['load_s']:.2f} s in a worker "
                f"(longest UI stall {m['load_max_ui_gap_ms']:.0f} ms); /debug with {args.max_new_tokens} new tokens "
                f"{m['answer_s']:.2f} s -> {m['answer_status']} (longest UI stall {m['answer_max_ui_gap_ms']:.0f} ms)"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.tui_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="also load this checkpoint and answer one request")
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    if args.model and not Path(args.model).is_dir():
        print(f"tests.tui_bench: error: no such checkpoint directory: {args.model}", file=sys.stderr)
        return 2
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
