"""The engine: one model loaded once, generation on one worker thread, events out.

``Engine.stream(request)`` turns a :class:`assistant.tasks.TaskRequest` into a stream of
:class:`Event`: ``reasoning`` deltas (the model's text before ``<|/think|>``), then
``answer`` deltas, then one ``done`` event carrying the parsed result (or one ``error``
event). The engine satisfies :class:`assistant.protocols.Engine` (what the faces use); the
model forward is not thread-safe, so every model call of every request runs
on the engine's single worker thread; ``stream`` may be called from any thread and
``astream`` from asyncio. A :class:`CancelToken` stops generation within one token, and
every request is guarded by a token limit and a time limit.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from assistant.protocols import CancelToken, EngineError, Event, Tokenizer
from model.generate import GenerationResult, SamplingParams

if TYPE_CHECKING:
    from assistant.config import Settings
    from assistant.tasks import TaskRequest

__all__ = ["CancelToken", "Engine", "EngineError", "Event", "Backend", "ModelBackend"]

DEFAULT_CONTEXT_LENGTH = 2048
_POLL_S = 0.1  # queue polling period: keeps the consumer interruptible by Ctrl-C


class Backend:
    """What the engine needs from the model side. :class:`ModelBackend` is the real one;
    tests substitute scripted fakes for deterministic outputs."""

    tokenizer: Tokenizer
    context_length: int

    def stream(self, prompt_ids: list[int], params: SamplingParams, cancel: CancelToken | None) -> Iterator[Any]:
        raise NotImplementedError

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                       cancel: CancelToken | None = None) -> list[GenerationResult]:
        raise NotImplementedError

    def token_logprobs(self, ids: list[int]) -> list[float]:
        raise NotImplementedError

    def next_token_logprobs(self, ids: list[int], candidates: Sequence[int]) -> list[float]:
        """log P(c | ids) for each candidate next token (the debug gate's question)."""
        return [self.token_logprobs([*ids, c])[-1] for c in candidates]


def _context_length(config: Any) -> int:
    for name in ("max_seq_len", "context_length", "max_len", "block_size", "seq_len", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT_LENGTH


class ModelBackend(Backend):
    """Adapter over ``model.generate`` for a loaded model."""

    def __init__(self, model: Any, tokenizer: Any, config: Any = None, context_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.context_length = context_length or _context_length(config)

    def stream(self, prompt_ids, params, cancel):
        from model import generate as gen

        return gen.stream(self.model, self.tokenizer, prompt_ids, params, cancel=cancel)

    def generate_batch(self, prompts, params, cancel=None):
        from model import generate as gen

        return gen.generate_batch(self.model, self.tokenizer, prompts, params, cancel=cancel,
                                  batch_size=max(1, len(prompts)))

    def token_logprobs(self, ids):
        from model import generate as gen

        return gen.token_logprobs(self.model, ids)

    def next_token_logprobs(self, ids, candidates):
        import torch

        with torch.no_grad():  # one forward for all candidates
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.model.tok_emb.weight.device)
            logp = self.model(x, last_only=True)[0, -1].float().log_softmax(-1)
        return [float(logp[c]) for c in candidates]


@dataclass
class _Job:
    fn: Callable[[], None]


class Engine:
    """One model, loaded once; a single worker thread runs every model call."""

    def __init__(self, model_dir: str | None = None, device: str = "cpu", *, backend: Backend | None = None,
                 default_max_new_tokens: int = 256, default_max_seconds: float | None = 60.0,
                 max_new_tokens_for: dict[str, int] | None = None, completion_context_tokens: int | None = 512,
                 completion_beams: int = 1, disabled_tasks: frozenset[str] = frozenset(), watermark: Any = None):
        if backend is None:
            from model.checkpoint import load_model

            loaded = load_model(model_dir, device=device)
            backend = ModelBackend(loaded.model, loaded.tokenizer, loaded.config)
        self.backend = backend
        self.device = device
        self.default_max_new_tokens = default_max_new_tokens
        self.default_max_seconds = default_max_seconds
        self.default_max_new_tokens_for = dict(max_new_tokens_for or {})
        # completions are latency-bound: their prompt is capped below the context length
        self.completion_context_tokens = completion_context_tokens
        # single-line completions search this many beams (model.generate._beam_decode); 1 = greedy
        self.completion_beams = completion_beams
        self.disabled_tasks = frozenset(disabled_tasks)  # the config file's [features] switched off
        self.watermark = watermark  # a model.watermark.Watermark: every generation carries its mark
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, model_dir: str | None = None, device: str | None = None) -> Engine:
        """The engine a face gets: ``settings`` (already ``for_face``) with the face's own
        ``model_dir``/``device`` (a flag, an editor setting) winning over the file's."""
        return cls(model_dir or settings.model, device=device or settings.device, **settings.engine_options())

    @classmethod
    def from_loaded(cls, model: Any = None, tokenizer: Any = None, config: Any = None, *,
                    backend: Backend | None = None, context_length: int | None = None, **kwargs: Any) -> Engine:
        """An engine over an already loaded model (or a ``LoadedModel``), or over a test backend."""
        if backend is None:
            if tokenizer is None and hasattr(model, "tokenizer"):  # a LoadedModel
                model, tokenizer, config = model.model, model.tokenizer, model.config
            backend = ModelBackend(model, tokenizer, config, context_length)
        return cls(backend=backend, **kwargs)

    # -- properties -------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.backend.tokenizer

    @property
    def context_length(self) -> int:
        return self.backend.context_length

    def count_tokens(self, text: str) -> int:
        return self.tokenizer.count(text)

    # -- the worker ---------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._closed:
                raise EngineError("engine is closed")
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="moecoder-engine", daemon=True)
                self._worker.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.fn()
            except BaseException:  # noqa: BLE001 - jobs report their own errors; never kill the worker
                pass

    def submit(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread and return its result (raises what it raised)."""
        box: queue.Queue[tuple[bool, Any]] = queue.Queue()

        def job() -> None:
            try:
                box.put((True, fn()))
            except BaseException as e:  # noqa: BLE001
                box.put((False, e))

        if threading.current_thread() is self._worker:
            return fn()
        self._ensure_worker()
        self._jobs.put(_Job(job))
        while True:
            try:
                ok, value = box.get(timeout=_POLL_S)
                break
            except queue.Empty:
                continue
        if ok:
            return value
        raise value

    def read_repository(self, root: str, read_s: float, stop: Callable[[], bool] | None = None) -> dict | None:
        """Read the project at ``root`` into the completion memory (assistant/memory.py) for at most
        about ``read_s`` seconds, or until ``stop()`` (checked between the model's windows; one window
        at least), on the worker thread; later calls go on where this one stopped and pick up edited
        files. {"complete", "entries", "files"}; None where the backend has no local model (no memory)."""
        from assistant.memory import can_read, memory_for

        model = getattr(self.backend, "model", None)
        if not can_read(model, root):
            return None

        def read() -> dict:
            mem = memory_for(model, self.tokenizer, root, quiet=True, read_s=read_s, stop=stop)
            return {"complete": mem.complete, "entries": mem.entries, "files": len(mem.file_ids)}

        return self.submit(read)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after its current job (waits up to ``timeout`` seconds, so that
        the interpreter never exits with the model still running on another thread)."""
        with self._start_lock:
            self._closed = True
            worker = self._worker
            if worker is not None:
                self._jobs.put(None)
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------
    def sampling_params(self, max_new_tokens: int | None, max_seconds: float | None, **kwargs: Any) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens or self.default_max_new_tokens,
            max_seconds=max_seconds if max_seconds is not None else self.default_max_seconds,
            **{"watermark": self.watermark, **kwargs},
        )

    def stream(self, request: TaskRequest, cancel: CancelToken | None = None) -> Iterator[Event]:
        """Events of one request: reasoning deltas, answer deltas, then done (or error).

        Thread-safe. Closing the iterator early cancels the request.
        """
        from assistant import tasks

        cancel = cancel or CancelToken()
        out: queue.Queue[Event | None] = queue.Queue()

        def job() -> None:
            try:
                for event in tasks.execute(self, request, cancel):
                    out.put(event)
            except Exception as e:  # noqa: BLE001 - reported as an event
                out.put(Event("error", text=_one_line(e)))
            finally:
                out.put(None)

        self._ensure_worker()
        self._jobs.put(_Job(job))
        finished = False
        try:
            while True:
                try:
                    event = out.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if event is None:
                    finished = True
                    return
                yield event
        finally:
            if not finished:
                cancel.cancel()

    async def astream(self, request: TaskRequest, cancel: CancelToken | None = None) -> AsyncIterator[Event]:
        """``stream`` for asyncio: the blocking queue is read on a helper thread."""
        cancel = cancel or CancelToken()
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue[Event | None] = asyncio.Queue()

        def put(item: Event | None) -> bool:
            try:
                loop.call_soon_threadsafe(aq.put_nowait, item)
                return True
            except RuntimeError:  # the loop is gone: nobody is listening any more
                cancel.cancel()
                return False

        def pump() -> None:
            try:
                for event in self.stream(request, cancel):
                    if not put(event):
                        return  # leaving the loop closes the stream, which cancels the request
            except Exception as e:  # noqa: BLE001
                put(Event("error", text=_one_line(e)))
            finally:
                put(None)

        thread = threading.Thread(target=pump, name="moecoder-astream", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                event = await aq.get()
                if event is None:
                    finished = True
                    return
                yield event
        finally:
            if not finished:
                cancel.cancel()

    def run(self, request: TaskRequest, cancel: CancelToken | None = None) -> object:
        """The result of the ``done`` event; raises :class:`EngineError` on an ``error`` event."""
        result: object | None = None
        for event in self.stream(request, cancel):
            if event.kind == "error":
                raise EngineError(event.text)
            if event.kind == "done":
                result = event.result
        return result

    def run_batch(self, requests: Sequence[TaskRequest], batch_size: int = 4,
                  progress: Callable[[int], None] | None = None) -> list[object]:
        """Results of many requests with batched generation (the review CLI's road).

        Each entry is the task's result, or an :class:`EngineError` for a request that
        failed. ``progress(n)`` is called after every batch with the number finished.
        """
        from assistant import tasks

        return tasks.execute_batch(self, list(requests), batch_size=batch_size, progress=progress)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(e).__name__}: {msg}" if not isinstance(e, (EngineError, ValueError)) or not msg else msg
