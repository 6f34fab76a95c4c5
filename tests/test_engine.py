"""assistant.engine: events, cancellation, guards, threads, asyncio."""

from __future__ import annotations

import asyncio
import threading

import pytest
from assistant_fakes import ScriptedBackend

from assistant.engine import CancelToken, Engine, EngineError, Event, ModelBackend
from assistant.tasks import Completion, DebugResult, Docstring, Explanation, TaskRequest

SRC = '''def add(a, b):
    total = a + b
    return total


def scale(xs, k):
    out = []
    for x in xs:
        out.append(x * k)
    return out
'''


@pytest.fixture
def fake(tiny_tokenizer):
    def script(task, code):
        if task == "debug":
            return "Step one. Step two.", "line 2: adds instead of subtracting\nfix: total = a - b"
        if task == "comment":
            return "It adds.", "Add two numbers.\n\nArgs:\n    a: first.\n    b: second.\n\nReturns:\n    the sum."
        if task == "explain":
            return "Reading it.", "It adds a and b."
        return "", "a + b"

    backend = ScriptedBackend(tiny_tokenizer, script)
    return Engine.from_loaded(backend=backend), backend


def test_event_order_reasoning_then_answer_then_done(fake):
    engine, _ = fake
    events = list(engine.stream(TaskRequest("debug", SRC, function="add")))
    kinds = [e.kind for e in events]
    assert kinds[-1] == "done" and "error" not in kinds
    first_answer = kinds.index("answer")
    assert set(kinds[:first_answer]) == {"reasoning"} and first_answer > 0
    assert set(kinds[first_answer:-1]) == {"answer"}
    assert "".join(e.text for e in events if e.kind == "reasoning") == "Step one. Step two."
    result = events[-1].result
    assert isinstance(result, DebugResult) and result.reasoning == "Step one. Step two."
    assert [(h.line, h.fix) for h in result.hints] == [(1, "    total = a - b")]


def test_each_task_returns_its_dataclass(fake):
    engine, _ = fake
    assert isinstance(engine.run(TaskRequest("complete", SRC, line=1, column=12)), Completion)
    assert isinstance(engine.run(TaskRequest("comment", SRC, function="add")), Docstring)
    assert isinstance(engine.run(TaskRequest("explain", SRC, line=0, end_line=2)), Explanation)


def test_errors_are_events_and_run_raises(fake):
    engine, _ = fake
    events = list(engine.stream(TaskRequest("comment", SRC, function="missing")))
    assert [e.kind for e in events] == ["error"] and "missing" in events[0].text
    with pytest.raises(EngineError, match="unknown task"):
        engine.run(TaskRequest("dance", SRC))
    # the worker survives errors
    assert isinstance(engine.run(TaskRequest("explain", SRC, line=0, end_line=1)), Explanation)


def test_cancel_stops_within_one_token(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, endless=True)
    engine = Engine.from_loaded(backend=backend, default_max_new_tokens=10_000)
    cancel = CancelToken()
    seen = []
    for ev in engine.stream(TaskRequest("explain", SRC, line=0, end_line=2, max_new_tokens=100_000), cancel):
        seen.append(ev)
        if len(seen) == 5:
            cancel.cancel()
    assert seen[-1] == Event("error", "cancelled")
    # the backend never checks the token: the engine stopped pulling within one token
    assert backend.tokens_after_cancel <= 1


def test_closing_the_stream_cancels(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, endless=True)
    engine = Engine.from_loaded(backend=backend)
    cancel = CancelToken()
    it = engine.stream(TaskRequest("explain", SRC, line=0, end_line=2, max_new_tokens=100_000), cancel)
    next(it)
    it.close()
    assert cancel.cancelled


class CountingBackend(ModelBackend):
    """The real model, with a cancel fired from inside the stream after ``cancel_at`` tokens."""

    def __init__(self, loaded, cancel_at=None):
        super().__init__(loaded.model, loaded.tokenizer, loaded.config)
        self.cancel_at = cancel_at
        self.produced = 0
        self.after_cancel = 0

    def stream(self, prompt_ids, params, cancel):
        for ev in super().stream(prompt_ids, params, cancel):
            self.produced += 1
            if cancel is not None and cancel.cancelled:
                self.after_cancel += 1
            if self.cancel_at is not None and self.produced == self.cancel_at and cancel is not None:
                cancel.cancel()
            yield ev


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from model.checkpoint import load_model

    return load_model(tiny_model_dir)


def test_real_model_cancel_within_one_token(loaded):
    backend = CountingBackend(loaded, cancel_at=3)
    engine = Engine.from_loaded(backend=backend)
    events = list(engine.stream(TaskRequest("explain", SRC, line=0, end_line=2, max_new_tokens=60)))
    assert events[-1].kind == "error" and events[-1].text == "cancelled"
    assert backend.produced == 3 and backend.after_cancel == 0


def test_real_model_guards_max_tokens_and_seconds(loaded):
    backend = CountingBackend(loaded)
    engine = Engine.from_loaded(backend=backend)
    result = engine.run(TaskRequest("debug", SRC, function="scale", max_new_tokens=5))
    assert isinstance(result, DebugResult) and backend.produced <= 5
    backend.produced = 0
    engine.run(TaskRequest("explain", SRC, line=0, end_line=2, max_new_tokens=200, max_seconds=1e-9))
    assert backend.produced == 1  # out of time after the first token


def test_engine_loads_a_model_dir_and_counts_tokens(tiny_model_dir):
    engine = Engine(str(tiny_model_dir))
    assert engine.context_length == 256
    assert engine.count_tokens("def f(x):\n    return x\n") == len(engine.tokenizer.encode("def f(x):\n    return x\n"))
    result = engine.run(TaskRequest("complete", SRC, line=2, column=4, max_new_tokens=4))
    assert isinstance(result, Completion)
    engine.close()


def test_bad_model_dir_is_a_one_line_value_error(tmp_path):
    with pytest.raises(ValueError) as info:
        Engine(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)


def test_thread_safe_concurrent_requests(tiny_tokenizer):
    """Concurrent streams from many threads: each gets exactly its own events and result
    (the script answers from the code in the prompt, so crosstalk shows in the text)."""

    def script(task, code):
        name = "add" if "def add" in code else "scale" if "def scale" in code else "?"
        line = "total = a + b" if name == "add" else "out.append(x * k)"
        return f"Reading {name} step by step.", f"line 1: `{line}` is wrong in {name}\nfix: {line}  # {name}"

    engine = Engine.from_loaded(backend=ScriptedBackend(tiny_tokenizer, script))
    got: dict[int, tuple[str, str, object]] = {}
    errors: list[BaseException] = []
    names = ["add", "scale"] * 4

    def worker(i: int, fn: str) -> None:
        try:
            reasoning, answer, result = [], [], None
            for ev in engine.stream(TaskRequest("debug", SRC, function=fn, max_new_tokens=64)):
                {"reasoning": reasoning, "answer": answer}.get(ev.kind, []).append(ev.text)
                if ev.kind == "done":
                    result = ev.result
            got[i] = ("".join(reasoning), "".join(answer), result)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, fn)) for i, fn in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert not errors and len(got) == len(names)
    for i, fn in enumerate(names):
        reasoning, answer, result = got[i]
        other = "scale" if fn == "add" else "add"
        assert reasoning == f"Reading {fn} step by step.", (fn, reasoning)
        assert f"wrong in {fn}" in answer and other not in answer, (fn, answer)
        assert isinstance(result, DebugResult) and result.reasoning == reasoning
        want_line = 1 if fn == "add" else 8  # 0-based file line of the quoted statement
        assert [h.line for h in result.hints] == [want_line], (fn, result.hints)


async def test_astream_from_asyncio(fake):
    engine, _ = fake
    kinds = [ev.kind async for ev in engine.astream(TaskRequest("explain", SRC, line=0, end_line=2))]
    assert kinds[0] == "reasoning" and kinds[-1] == "done"
    # several streams interleave on one loop; the model still runs one request at a time
    async def collect(fn):
        return [ev async for ev in engine.astream(TaskRequest("debug", SRC, function=fn))]

    a, b = await asyncio.gather(collect("add"), collect("scale"))
    assert a[-1].kind == b[-1].kind == "done"


async def test_astream_break_cancels(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, endless=True)
    engine = Engine.from_loaded(backend=backend)
    cancel = CancelToken()
    agen = engine.astream(TaskRequest("explain", SRC, line=0, end_line=2, max_new_tokens=100_000), cancel)
    async for _ev in agen:
        break
    await agen.aclose()
    assert cancel.cancelled
