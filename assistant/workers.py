"""Worker processes for batch work (the review): ``--jobs N`` runs N engines in parallel.

One engine runs every model call on one thread, and on a CPU a batch of short generations
keeps one or two cores busy at best (Python between tokens, small matrices). ``WorkerPool``
starts N processes (``spawn``: no torch state is forked), each loading the model once with
``torch.set_num_threads(cores // N)``, and hands them chunks of task requests; results come
back as they finish. The workers ignore SIGINT (the terminal sends it to the whole process
group): the parent decides, stops them and keeps what came back.

    with WorkerPool(settings, model_dir, workers=2) as pool:
        pool.wait_ready()                         # the models are loaded
        for i, result in pool.run(requests, batch_size=4):
            ...
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

_ENGINE: Any = None
_INIT_ERROR: str | None = None
_CHUNK = 8  # requests per hand-out: small enough to balance, large enough to batch


def _init(settings: Any, model_dir: str | None, threads: int) -> None:
    global _ENGINE, _INIT_ERROR
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:  # a failing initializer would make the pool start workers forever: keep the error
        import torch

        torch.set_num_threads(max(1, threads))
        from assistant.engine import Engine

        _ENGINE = Engine.from_settings(settings, model_dir)
    except Exception as e:  # noqa: BLE001 - reported by wait_ready
        _INIT_ERROR = str(e).splitlines()[0] if str(e) else type(e).__name__


def _ready(_: int) -> str | None:
    return _INIT_ERROR


def _run(args: tuple[list[tuple[int, Any]], int]) -> list[tuple[int, object]]:
    from assistant.engine import EngineError
    from assistant.tasks import iter_batch

    chunk, batch_size = args
    if _ENGINE is None:
        raise RuntimeError(_INIT_ERROR or "the worker has no engine")
    reqs = [r for _, r in chunk]
    out: list[tuple[int, object]] = []
    for k, result in iter_batch(_ENGINE, reqs, batch_size=batch_size):
        if isinstance(result, BaseException) and not isinstance(result, EngineError):
            result = EngineError(str(result).splitlines()[0] if str(result) else type(result).__name__)
        out.append((chunk[k][0], result))
    return out


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(jobs: int, adaptive: bool = False) -> int:
    """Workers for ``--jobs N``: N, but not more than the CPUs this process may use. With
    ``adaptive`` (N from the config file, not the command line) also not more than the idle
    CPUs plus one: on a busy machine extra processes only compete for the same cores (measured:
    docs/benchmarks.md, "Review throughput")."""
    n = max(1, min(jobs, _cpus()))
    if adaptive:
        try:
            idle = _cpus() - os.getloadavg()[0]
        except OSError:
            idle = _cpus()
        n = max(1, min(n, int(idle) + 1))
    return n


class WorkerPool:
    def __init__(self, settings: Any, model_dir: str | None, workers: int, threads: int | None = None):
        cpus = _cpus()
        self.workers = max(1, workers)
        threads = threads or max(1, cpus // self.workers)
        ctx = multiprocessing.get_context("spawn")
        self._pool = ctx.Pool(self.workers, initializer=_init, initargs=(settings, model_dir, threads))

    def wait_ready(self) -> None:
        """Block until every worker has loaded its model; ValueError with a worker's error."""
        for err in self._pool.map(_ready, range(self.workers), chunksize=1):
            if err is not None:
                raise ValueError(err)

    def run(self, requests: Sequence[Any], batch_size: int = 4) -> Iterator[tuple[int, object]]:
        """``(index, result)`` as chunks finish, in no particular order."""
        items = list(enumerate(requests))
        chunks = [(items[a:a + _CHUNK], batch_size) for a in range(0, len(items), _CHUNK)]
        for part in self._pool.imap_unordered(_run, chunks):
            yield from part

    def close(self) -> None:
        self._pool.terminate()  # whatever is still running is not wanted any more
        self._pool.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
