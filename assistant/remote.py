"""A running ``moecoder serve`` as an engine: the faces' ``--server URL``.

:class:`RemoteEngine` has the public methods of :class:`assistant.engine.Engine`
(``tokenizer``, ``context_length``, ``count_tokens``, ``stream``, ``astream``, ``run``,
``run_batch``, ``close``): tasks are planned and generated on the server (batched with
every other client there) and come back as the same :class:`~assistant.engine.Event`
stream, ending with the same result objects. The tokenizer is fetched from the server
once (for context budgets); cancelling or leaving a stream closes its connection, which
stops the generation on the server within a step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from assistant.engine import CancelToken, EngineError, Event

__all__ = ["RemoteEngine", "result_from_json", "result_to_json"]


# --------------------------------------------------------------------------- results on the wire
def result_to_json(obj: object) -> dict | None:
    """A task result (Completion, Docstring, DebugResult, Explanation) as JSON data."""
    if obj is None or not dataclasses.is_dataclass(obj):
        return None
    return {"type": type(obj).__name__, **dataclasses.asdict(obj)}


def result_from_json(data: dict | None) -> object | None:
    from assistant import tasks

    if not data:
        return None
    data = dict(data)
    name = data.pop("type", None)
    cls = {c.__name__: c for c in (tasks.Completion, tasks.Docstring, tasks.DebugResult, tasks.Explanation)}.get(name)
    if cls is None:
        raise EngineError(f"the server sent an unknown result type {name!r}")
    if cls is tasks.DebugResult:
        data["hints"] = [tasks.Hint(**h) for h in data.get("hints", [])]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in fields})


class _RemoteTokenizer:
    """Token counts through the server, for models whose tokenizer is not one file."""

    def __init__(self, engine: RemoteEngine):
        self._engine = engine

    def encode(self, text: str) -> list[int]:
        return self._engine._post_json("/v1/moecoder/tokenize", {"text": text})["ids"]

    def count(self, text: str) -> int:
        return len(self.encode(text))


class RemoteEngine:
    """The engine interface over HTTP to ``moecoder serve`` at ``url``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0,
                 default_max_new_tokens: int | None = None):
        import httpx

        base = url.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        if not base.startswith(("http://", "https://")):
            raise EngineError(f"--server must be an http:// or https:// URL, not {url!r}")
        self.url = base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(timeout, read=None))
        self._tokenizer: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self.info = self._get_json("/v1/moecoder/info")
        self.context_length = int(self.info["context_length"])
        self.model_name = str(self.info.get("model", "moecoder"))
        self.device = f"server {self.url}"
        self.default_max_new_tokens = default_max_new_tokens or int(self.info.get("max_tokens", 256))

    # ----------------------------------------------------------------- HTTP
    def _check(self, r: Any) -> None:
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except Exception:  # noqa: BLE001
                msg = r.text[:200]
            raise EngineError(f"server {self.url}: {r.status_code}: {msg}")

    def _get_json(self, path: str) -> Any:
        import httpx

        try:
            r = self._client.get(path)
        except httpx.HTTPError as e:
            raise EngineError(f"cannot reach the moecoder server at {self.url}: {e}") from None
        self._check(r)
        return r.json()

    def _post_json(self, path: str, body: dict) -> Any:
        import httpx

        try:
            r = self._client.post(path, json=body)
        except httpx.HTTPError as e:
            raise EngineError(f"cannot reach the moecoder server at {self.url}: {e}") from None
        self._check(r)
        return r.json()

    # ----------------------------------------------------------------- the Engine interface
    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._fetch_tokenizer()
            return self._tokenizer

    def _fetch_tokenizer(self) -> Any:
        import httpx

        try:
            r = self._client.get("/v1/moecoder/tokenizer")
        except httpx.HTTPError as e:
            raise EngineError(f"cannot reach the moecoder server at {self.url}: {e}") from None
        if r.status_code == 404:
            return _RemoteTokenizer(self)
        self._check(r)
        from model.tokenizer import Tokenizer

        name = Path(r.headers.get("x-moecoder-tokenizer", "tokenizer.model")).name
        self._tmp = tempfile.TemporaryDirectory(prefix="moecoder-tok-")
        path = Path(self._tmp.name) / name
        path.write_bytes(r.content)
        return Tokenizer.load(path)

    def count_tokens(self, text: str) -> int:
        tok = self.tokenizer
        return tok.count(text) if hasattr(tok, "count") else len(tok.encode(text))

    def stream(self, request: Any, cancel: CancelToken | None = None) -> Iterator[Event]:
        """Events of one task request, generated on the server. Closing early cancels it."""
        import httpx

        if self._closed:
            raise EngineError("engine is closed")
        cancel = cancel or CancelToken()
        body = {k: v for k, v in dataclasses.asdict(request).items() if v is not None}
        finished = False
        try:
            with self._client.stream("POST", "/v1/moecoder/tasks", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        msg = r.json()["error"]["message"]
                    except Exception:  # noqa: BLE001
                        msg = r.text[:200]
                    yield Event("error", msg)
                    finished = True
                    return
                for line in r.iter_lines():
                    if cancel.cancelled:
                        yield Event("error", "cancelled")
                        finished = True
                        return  # leaving the block closes the connection: the server stops
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    d = json.loads(data)
                    yield Event(d["kind"], d.get("text", ""), result_from_json(d.get("result")))
            finished = True
        except httpx.HTTPError as e:
            finished = True
            yield Event("error", f"lost the moecoder server at {self.url}: {e}")
        finally:
            if not finished:
                cancel.cancel()

    async def astream(self, request: Any, cancel: CancelToken | None = None) -> AsyncIterator[Event]:
        cancel = cancel or CancelToken()
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue[Event | None] = asyncio.Queue()

        def pump() -> None:
            try:
                for ev in self.stream(request, cancel):
                    loop.call_soon_threadsafe(aq.put_nowait, ev)
            except RuntimeError:
                cancel.cancel()
            finally:
                try:
                    loop.call_soon_threadsafe(aq.put_nowait, None)
                except RuntimeError:
                    pass

        threading.Thread(target=pump, name="moecoder-remote", daemon=True).start()
        finished = False
        try:
            while True:
                ev = await aq.get()
                if ev is None:
                    finished = True
                    return
                yield ev
        finally:
            if not finished:
                cancel.cancel()

    def run(self, request: Any, cancel: CancelToken | None = None) -> object:
        result = None
        for ev in self.stream(request, cancel):
            if ev.kind == "error":
                raise EngineError(ev.text)
            if ev.kind == "done":
                result = ev.result
        return result

    def run_batch(self, requests: Sequence[Any], batch_size: int = 4,
                  progress: Callable[[int], None] | None = None) -> list[object]:
        """Results of many requests, ``batch_size`` in flight at once (the server batches them)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(req: Any) -> object:
            try:
                return self.run(req)
            except EngineError as e:
                return e

        out: list[object] = []
        with ThreadPoolExecutor(max_workers=max(1, batch_size)) as pool:
            for i, res in enumerate(pool.map(one, requests)):
                out.append(res)
                if progress is not None:
                    progress(i + 1)
        return out

    def close(self, timeout: float = 30.0) -> None:
        self._closed = True
        self._client.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def engine_from_settings(settings: Any, model_dir: str | None = None, device: str | None = None) -> Any:
    """The engine a face gets: a :class:`RemoteEngine` when the settings (already
    ``for_face``; ``--server URL`` sets them) name a server, else the in-process engine."""
    import os

    if getattr(settings, "server", None):
        return RemoteEngine(settings.server, api_key=os.environ.get("MOECODER_API_KEY"),
                            default_max_new_tokens=None)
    from assistant.engine import Engine

    return Engine.from_settings(settings, model_dir, device)
