"""The OpenAI-compatible HTTP API over :class:`assistant.serving.Service` (FastAPI).

Endpoints: ``POST /v1/completions`` (``prompt`` + ``suffix`` = fill in the middle),
``POST /v1/chat/completions`` (task routing; streamed reasoning in ``reasoning_content``
before ``content``, as the DeepSeek API does), ``GET /v1/models``, ``GET /health``, and
moecoder's own ``/v1/moecoder/*`` (info, tokenizer, tokenize, tasks) that
``assistant.remote.RemoteEngine`` uses. Every error is a JSON body
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for bad requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from assistant.remote import result_to_json
from assistant.serving import CancelToken, Event, ServiceError, TaskRequest, route_chat

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "time": "length", "cancelled": "stop"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (penalties, user...)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    seed: int | None = None
    max_seconds: float | None = Field(default=None, gt=0)  # moecoder: tighter than the server's limit
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionBody(_Body):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of exactly one string)")
            return v[0]
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class TaskBody(BaseModel):
    # the fields of assistant.tasks.TaskRequest; newer ones pass through (extra), unknown ones are refused there
    model_config = ConfigDict(extra="allow")
    task: Literal["complete", "comment", "debug", "explain"]
    source: str
    path: str | None = None
    line: int = Field(default=0, ge=0)
    column: int = Field(default=0, ge=0)
    end_line: int | None = Field(default=None, ge=0)
    function: str | None = None
    related: list[tuple[str, str]] = []
    max_new_tokens: int | None = Field(default=None, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)
    context_tokens: int | None = Field(default=None, ge=1)
    question: str | None = None


# --------------------------------------------------------------------------- helpers
def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


_NOTHING = object()


class _Bridge:
    """Items pushed from worker threads into an asyncio queue (None ends the stream)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody listens
            pass

    def run_thread(self, it: Callable[[], Iterator[Any]]) -> None:
        def pump() -> None:
            try:
                for item in it():
                    self.put(item)
            except Exception as e:  # noqa: BLE001 - becomes an error event
                self.put(Event("error", str(e).splitlines()[0] if str(e) else type(e).__name__))
            finally:
                self.put(None)

        threading.Thread(target=pump, name="moecoder-serve-task", daemon=True).start()

    async def items(self, request: Request | None = None) -> AsyncIterator[Any]:
        checked = time.monotonic()
        while True:
            if request is None:
                item = await self.q.get()
            else:  # a plain (non-streaming) request: notice a client that went away (every 0.5 s)
                try:
                    item = await asyncio.wait_for(self.q.get(), 0.5)
                except TimeoutError:
                    item = _NOTHING
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if item is _NOTHING:
                    continue
            if item is None:
                return
            yield item


def create_app(service: Any, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``service`` (an :class:`assistant.serving.Service`)."""
    app = FastAPI(title="moecoder", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    created = int(time.time())

    # ----------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, e: RequestValidationError):
        return _validation_response(e.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    if api_key:
        app.add_middleware(_BearerAuth, key=api_key)

    async def parse(request: Request, cls: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            raise _ValidationFailed(e.errors()) from None
        model = getattr(body, "model", None)
        if model is not None and model not in (service.name, "moecoder"):
            raise APIError(404, f"the model {model!r} does not exist (this server serves {service.name!r})",
                           param="model", code="model_not_found")
        return body

    def check_alive() -> None:
        h = service.health
        if h.get("error"):
            raise APIError(503, h["error"], "server_error")

    # ----------------------------------------------------------------- info
    @app.get("/health")
    async def health():
        h = service.health
        return JSONResponse(h, status_code=503 if h.get("error") else 200)

    def model_card() -> dict:
        return {"id": service.name, "object": "model", "created": created, "owned_by": "moecoder",
                "context_length": service.context_length}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id not in (service.name, "moecoder"):
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    # ----------------------------------------------------------------- completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionBody = await parse(request, CompletionBody)
        check_alive()
        if body.echo or body.logprobs:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if body.echo else "logprobs")
        prompt_ids, stop_ids = service.prompt_ids(body.prompt, body.suffix)
        try:
            params = service.params(body.max_tokens or 16, body.temperature, body.top_p, body.stops, body.seed,
                                    stop_ids, body.max_seconds)
        except ServiceError as e:
            raise APIError(400, str(e)) from None
        cid, name = f"cmpl-{uuid.uuid4().hex}", service.name
        cancel = CancelToken()
        bridge = _Bridge()
        try:
            handle = service.generate(prompt_ids, params, cancel, sink=bridge.put)
        except ServiceError as e:
            code = "context_length_exceeded" if "context length" in str(e) else None
            raise APIError(400, str(e), param="prompt", code=code) from None

        def usage() -> dict:
            n = len(handle.result.token_ids)
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                try:
                    async for ev in bridge.items():
                        if ev.text:
                            yield _sse(chunk(ev.text, None))
                    if handle.error:
                        yield _sse(error_body(handle.error, "server_error"))
                        return
                    yield _sse(chunk("", FINISH.get(handle.result.finish_reason, "stop")))
                    if (body.stream_options or {}).get("include_usage"):
                        yield _sse({**chunk("", None), "choices": [], "usage": usage()})
                    yield _sse("[DONE]")
                finally:
                    cancel.cancel()  # a client that went away stops its generation at the next step

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            async for _ in bridge.items(request):
                pass
        finally:
            cancel.cancel()
        if handle.error:
            raise APIError(503, handle.error, "server_error")
        out = chunk(handle.result.text, FINISH.get(handle.result.finish_reason, "stop"))
        return {**out, "usage": usage()}

    # ----------------------------------------------------------------- chat
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body: ChatBody = await parse(request, ChatBody)
        check_alive()
        try:
            route = route_chat([m.model_dump() for m in body.messages])
        except ServiceError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        cid, name = f"chatcmpl-{uuid.uuid4().hex}", service.name
        cancel = CancelToken()
        bridge = _Bridge()
        state = {"finish": "stop", "prompt_tokens": 0, "completion_tokens": 0, "error": None}
        if route.request is not None:
            req = route.request
            req.max_new_tokens = max_tokens
            req.max_seconds = body.max_seconds
            try:
                service.check_task(req)
            except ServiceError as e:
                raise APIError(400, str(e), param="messages") from None

            bridge.run_thread(lambda: service.run_task(req, cancel))
        else:
            try:
                chat_prompt = service.chat_prompt(route)
            except Exception as e:  # noqa: BLE001 - a template that fails on these messages
                raise APIError(400, f"chat template: {e}", param="messages") from None
            stops = tuple(body.stops) if body.stops else chat_prompt.stop_strings
            try:
                params = service.params(max_tokens, body.temperature, body.top_p, stops, body.seed,
                                        chat_prompt.stop_ids, body.max_seconds)
                handle = service.generate(chat_prompt.ids, params, cancel, sink=bridge.put)
            except ServiceError as e:
                code = "context_length_exceeded" if "context length" in str(e) else None
                raise APIError(400, str(e), param="messages", code=code) from None
            state["prompt_tokens"] = len(chat_prompt.ids)
            thinking = [chat_prompt.think_end is not None]
            answer_started = [False]

            def plain(ev: Any) -> Event | None:
                if thinking[0]:
                    if ev.token_id == chat_prompt.think_end:
                        thinking[0] = False
                        return None
                    return Event("reasoning", ev.text) if ev.text else None
                text = ev.text
                if chat_prompt.think_end is not None and not answer_started[0]:
                    text = text.lstrip("\n")  # the blank line after </think>
                    answer_started[0] = bool(text)
                return Event("answer", text) if text else None

        async def deltas(req_for_disconnect: Request | None) -> AsyncIterator[tuple[str, str]]:
            """(field, text) deltas: reasoning_content first, then content."""
            async for ev in bridge.items(req_for_disconnect):
                if route.request is None:
                    ev = plain(ev)
                    if ev is None:
                        continue
                if ev.kind == "reasoning" and ev.text:
                    yield "reasoning_content", ev.text
                elif ev.kind == "answer" and ev.text:
                    yield "content", ev.text
                elif ev.kind == "error":
                    state["error"] = ev.text
                elif ev.kind == "done":
                    state["result"] = result_to_json(ev.result)
            if route.request is None:
                res = handle.result
                state["completion_tokens"] = len(res.token_ids)
                state["finish"] = FINISH.get(res.finish_reason, "stop")
                if handle.error:
                    state["error"] = handle.error

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if body.stream:
            async def events() -> AsyncIterator[bytes]:
                try:
                    yield _sse(chunk({"role": "assistant", "content": ""}, None))
                    async for field, text in deltas(None):
                        yield _sse(chunk({field: text}, None))
                    if state["error"] and state["error"] != "cancelled":
                        yield _sse(error_body(state["error"], "server_error"))
                        return
                    yield _sse(chunk({}, state["finish"]))
                    yield _sse("[DONE]")
                finally:
                    cancel.cancel()

            return StreamingResponse(events(), media_type="text/event-stream")
        parts: dict[str, list[str]] = {"reasoning_content": [], "content": []}
        try:
            async for field, text in deltas(request):
                parts[field].append(text)
        finally:
            cancel.cancel()
        if state["error"]:
            raise APIError(503 if route.request is None else 400, state["error"],
                           "server_error" if route.request is None else "invalid_request_error")
        message = {"role": "assistant", "content": "".join(parts["content"]),
                   "reasoning_content": "".join(parts["reasoning_content"])}
        out = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": name,
               "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": state["finish"]}],
               "usage": {"prompt_tokens": state["prompt_tokens"], "completion_tokens": state["completion_tokens"],
                         "total_tokens": state["prompt_tokens"] + state["completion_tokens"]}}
        if "result" in state:
            out["moecoder_result"] = state["result"]
        return out

    # ----------------------------------------------------------------- moecoder's own
    @app.get("/v1/moecoder/info")
    async def info():
        tok_path = getattr(service.tokenizer, "path", None)
        return {"model": service.name, "context_length": service.context_length, "ep": service.ep,
                "tokenizer": tok_path.name if tok_path is not None and tok_path.exists() else None,
                "max_seconds": service.max_seconds, "max_tokens": service.max_new_tokens}

    @app.get("/v1/moecoder/tokenizer")
    async def tokenizer():
        path = getattr(service.tokenizer, "path", None)
        if path is None or not path.exists():
            raise APIError(404, "this model's tokenizer is not a single file", code="not_found")
        return Response(path.read_bytes(), media_type="application/octet-stream",
                        headers={"x-moecoder-tokenizer": path.name})

    class _Tokenize(BaseModel):
        text: str

    @app.post("/v1/moecoder/tokenize")
    async def tokenize(request: Request):
        body = await parse(request, _Tokenize)
        return {"ids": service.tokenizer.encode(body.text)}

    @app.post("/v1/moecoder/tasks")
    async def tasks(request: Request):
        body: TaskBody = await parse(request, TaskBody)
        check_alive()
        known = {f.name for f in dataclasses.fields(TaskRequest)}
        data = {**body.model_dump(), "related": [tuple(r) for r in body.related]}
        unknown = sorted(set(data) - known)
        if unknown:
            raise APIError(400, f"unknown task field {unknown[0]!r}", param=unknown[0])
        req = TaskRequest(**data)
        try:
            service.check_task(req)
        except ServiceError as e:
            raise APIError(400, str(e)) from None
        cancel = CancelToken()
        bridge = _Bridge()
        bridge.run_thread(lambda: service.run_task(req, cancel))

        async def events() -> AsyncIterator[bytes]:
            try:
                async for ev in bridge.items():
                    d = {"kind": ev.kind, "text": ev.text}
                    if ev.kind == "done":
                        d["result"] = result_to_json(ev.result)
                    yield _sse(d)
                yield _sse("[DONE]")
            finally:
                cancel.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.exception_handler(_ValidationFailed)
    async def _validation_failed(_req: Request, e: _ValidationFailed):
        return _validation_response(e.errors)

    return app


class _BearerAuth:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the
    endpoints): /v1 requests need ``Authorization: Bearer KEY``."""

    def __init__(self, app: Any, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.want):
                response = JSONResponse(error_body("missing or wrong API key (Authorization: Bearer ...)",
                                                   "invalid_request_error", None, "invalid_api_key"), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _ValidationFailed(Exception):
    def __init__(self, errors: list) -> None:
        super().__init__("invalid request")
        self.errors = errors


def _validation_response(errors: list) -> JSONResponse:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return JSONResponse(error_body(f"{param}: {msg}" if param else msg, "invalid_request_error", param),
                        status_code=400)
