"""The model side of ``moecoder serve``: one model, one batching loop, tasks and chat on it.

:class:`Service` loads the model once (``model.checkpoint.load_model``: whatever it loads),
shards the routed experts when launched under ``torchrun`` with ``--ep N`` (rank 0 serves,
the other ranks follow its steps; ``model.parallel``), and runs every request through
the iteration-level batching loop of ``model.batching`` -- raw completions, fill in the
middle, our tasks (through :mod:`assistant.tasks` on an :class:`~assistant.engine.Engine`
whose backend is the batching loop) and plain chat. The HTTP face (``serve/``) uses only
this module.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.engine import Backend, CancelToken, Engine, Event
from assistant.tasks import TaskRequest
from model.generate import GenerationResult, SamplingParams, TokenEvent

__all__ = ["CancelToken", "ChatPrompt", "Event", "SamplingParams", "Service", "ServiceError", "TaskRequest", "TokenEvent",
           "route_chat", "split_fim_markers"]

TASKS = ("complete", "comment", "debug", "explain")


class ServiceError(ValueError):
    """A request that cannot be served as asked (one line, meant for the client)."""


class BatchingBackend(Backend):
    """:class:`assistant.engine.Backend` over the batching loop (thread-safe)."""

    def __init__(self, scheduler: Any, tokenizer: Any, context_length: int):
        self.scheduler, self.tokenizer, self.context_length = scheduler, tokenizer, context_length

    def stream(self, prompt_ids, params, cancel):
        return self.scheduler.submit(prompt_ids, params, cancel)

    def generate_batch(self, prompts, params, cancel=None) -> list[GenerationResult]:
        handles = [self.scheduler.submit(p, params, cancel) for p in prompts]
        for h in handles:
            for _ in h:
                pass
        return [h.result for h in handles]

    def token_logprobs(self, ids):
        return self.scheduler.score(ids)


@dataclass
class ChatRoute:
    """What a chat turn asks for: a task request, or a plain prompt to continue."""

    request: TaskRequest | None = None
    prompt: str | None = None
    messages: list[dict] | None = None  # plain chat: the conversation (role, text), for a chat template


@dataclass
class ChatPrompt:
    """A plain chat turn ready to generate: prompt ids, stops, and how to split the stream.

    ``think_end`` is set when the checkpoint thinks natively (``<think>...</think>``, as
    Qwen3): the tokens before it stream as reasoning, the rest as the answer."""

    ids: list[int]
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    think_end: int | None = None


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)
_BUGGY = re.compile(r"\b(bug|bugs|buggy|debug|wrong|fix|broken|error|crash|fails?|failing)\b", re.I)
_DOC = re.compile(r"\b(docstring|document|comment)\b", re.I)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def route_chat(messages: Sequence[dict]) -> ChatRoute:
    """Route a conversation's last user turn: ``/debug [FUNC]``, ``/comment [FUNC]``,
    ``/explain``, ``/complete`` followed by code (a fenced block, or the lines after the
    command) run that task; a fenced code block with words about a bug runs debug, about a
    docstring runs comment, else explain; text without code is plain chat."""
    user = [m for m in messages if m.get("role") == "user"]
    if not user:
        raise ServiceError("messages need at least one user message")
    text = _text_of(user[-1].get("content"))
    fence = _FENCE.search(text)
    first, _, rest = text.strip().partition("\n")
    task, func = None, None
    if first.startswith("/") and first[1:].split()[:1] and first[1:].split()[0].lower() in TASKS:
        words = first[1:].split()
        task, func = words[0].lower(), (words[1] if len(words) > 1 else None)
        code = fence.group(1) if fence else rest
        if not code.strip():
            raise ServiceError(f"/{task} needs code after it (a fenced block or the following lines)")
    elif fence:
        code = fence.group(1)
        words = text[:fence.start()] + text[fence.end():]
        task = "debug" if _BUGGY.search(words) else "comment" if _DOC.search(words) else "explain"
    else:
        turns = [{"role": str(m.get("role", "user")), "content": _text_of(m.get("content")).strip()}
                 for m in messages]
        lines = [f"{t['role'].capitalize()}: {t['content']}" for t in turns]
        return ChatRoute(prompt="\n".join(lines) + "\nAssistant:", messages=turns)
    code = code.rstrip("\n")
    src_lines = code.split("\n")
    if task == "complete":
        return ChatRoute(TaskRequest("complete", code, line=len(src_lines) - 1, column=len(src_lines[-1])))
    if task == "explain":
        return ChatRoute(TaskRequest("explain", code, line=0, end_line=len(src_lines) - 1))
    if task == "comment" and func is None:
        from assistant import code as codemod

        fns = codemod.functions(code)
        if not fns:
            raise ServiceError("/comment needs a function in the code")
        func = fns[0].qualname
    return ChatRoute(TaskRequest(task, code, function=func))


def split_fim_markers(prompt: str) -> tuple[str, str] | None:
    """(prefix, suffix) of a prompt that spells our FIM tokens as text, in either order
    (``<|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>`` or the suffix first); else None.
    Special tokens never come from encoding text, so such a prompt is rebuilt by id."""
    from model.formats import SPECIAL_TOKENS

    p, s, m = (SPECIAL_TOKENS[n] for n in ("fim_prefix", "fim_suffix", "fim_middle"))
    body = prompt.rstrip()
    if not body.endswith(m) or p not in body or s not in body:
        return None
    body = body[:-len(m)]
    if body.startswith(p):
        prefix, _, suffix = body[len(p):].partition(s)
    elif body.startswith(s):
        suffix, _, prefix = body[len(s):].partition(p)
    else:
        return None
    return prefix, suffix


class Service:
    """One model served through the batching loop (see the module docstring)."""

    def __init__(self, model_dir: str | None = None, device: str = "cpu", *, max_batch: int = 32,
                 context: int | None = None, ep: int = 1,
                 ep_timeout: float = 60.0, name: str | None = None, max_seconds: float = 120.0,
                 max_new_tokens: int = 256, on_fatal: Any = None, small_t: int | None = None,
                 watermark: Any = None, engine_options: dict | None = None):
        from model.batching import BatchScheduler, BatchState, follow
        from model.checkpoint import load_model
        from model.parallel import EP_SMALL_T, init_serve, plan_channel, shard_experts_for_inference

        self.dist = init_serve(ep, device, ep_timeout)
        if on_fatal is not None and self.dist.distributed:
            report = on_fatal

            def on_fatal(msg: str) -> None:  # noqa: F811 - the same callback, with the cause named
                report(f"the expert-parallel group failed (a rank died or hung?): {msg}")
        loaded = load_model(model_dir, device=self.dist.device, max_context=context)
        self.model, self.tokenizer, self.config = loaded.model, loaded.tokenizer, loaded.config
        self.model.eval()
        self.model_dir = model_dir
        self.name = name or (Path(model_dir).resolve().name if model_dir else "moecoder")
        self.context_length = int(self.model.cfg.max_seq_len)
        self.max_seconds, self.max_new_tokens = max_seconds, max_new_tokens
        self.watermark = watermark  # a model.watermark.Watermark: every generation carries its mark
        self.ep = self.dist.world_size
        if self.dist.distributed:
            shard_experts_for_inference(self.model, small_t=EP_SMALL_T if small_t is None else small_t)
        send, receive = plan_channel(self.dist) if self.dist.distributed else (None, None)
        self.is_leader = self.dist.rank == 0
        self.scheduler = None
        if self.is_leader:
            self.scheduler = BatchScheduler(self.model, self.tokenizer, max_batch, broadcast=send,
                                            heartbeat_s=max(0.5, ep_timeout / 4), on_fatal=on_fatal)
            backend = BatchingBackend(self.scheduler, self.tokenizer, self.context_length)
            opts = {**(engine_options or {}), "default_max_seconds": max_seconds,  # the config file's [serve]
                    "watermark": watermark}
            self.engine = Engine.from_loaded(backend=backend, **opts)
            self.scheduler.start()  # followers wait on its steps (and heartbeats) from now on
        else:
            self._follow = lambda: follow(BatchState(self.model, capacity=4), receive)

    # ----------------------------------------------------------------- ranks > 0
    def follow(self) -> None:
        """A follower rank: execute rank 0's steps until it stops (raises if it is lost)."""
        self._follow()

    # ----------------------------------------------------------------- prompts
    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def prompt_ids(self, prompt: str, suffix: str | None) -> tuple[list[int], tuple[int, ...]]:
        """(prompt ids, stop token ids): text continuation, or fill in the middle with a suffix.

        A fill-in-the-middle request goes through the context manager, which fits the
        prefix and suffix into the completion budget (long files are trimmed, not refused).
        """
        tok = self.tokenizer
        if suffix is None:
            split = split_fim_markers(prompt)
            if split is not None:  # clients that write the FIM prompt themselves (llm.nvim / llm-ls)
                prompt, suffix = split
        if suffix is None:
            ids = tok.encode(prompt)
            return (ids or [tok.eos_id]), ()
        from assistant.context import build_context
        from assistant.prompts import fim_stop_ids

        stops = fim_stop_ids(tok)  # the tokens this checkpoint has (open checkpoints differ)
        source = prompt + suffix
        lines = prompt.split("\n")
        budget = min(self.context_length // 2, self.engine.completion_context_tokens or self.context_length // 2)
        ctx = build_context(tok, source, len(lines) - 1, len(lines[-1]), budget=budget)
        return list(ctx.prompt_ids), stops

    def chat_prompt(self, route: ChatRoute) -> ChatPrompt:
        """The prompt of a plain chat turn: an open checkpoint with a chat template gets its
        own template (and stops at its end-of-turn tokens); our model and base checkpoints
        continue a ``User:``/``Assistant:`` transcript until the next ``User:``."""
        from assistant import prompts

        tok = self.tokenizer
        if route.messages is not None and prompts.kind(tok) == "chat":
            rendered = tok.render_chat(route.messages, add_generation_prompt=True)
            think = prompts.think_end_id(tok) if prompts.native_think(tok) else None
            if think is not None and not rendered.rstrip().endswith("<think>"):
                rendered += "<think>\n"  # the thinking starts at once: reasoning events first
            return ChatPrompt(tok.encode_with_specials(rendered), tuple(getattr(tok, "stop_ids", ())) or (tok.eos_id,),
                              (), think)
        ids, _ = self.prompt_ids(route.prompt or "", None)
        return ChatPrompt(ids, (), ("\nUser:",))

    def params(self, max_tokens: int | None, temperature: float, top_p: float, stop: Sequence[str],
               seed: int | None, stop_token_ids: Sequence[int] = (), max_seconds: float | None = None) -> SamplingParams:
        p = SamplingParams(max_new_tokens=max_tokens or self.max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_strings=tuple(stop), stop_token_ids=tuple(stop_token_ids),
                           max_seconds=min(self.max_seconds, max_seconds or self.max_seconds), seed=seed,
                           watermark=self.watermark)
        try:
            p.validate()
        except ValueError as e:
            raise ServiceError(str(e)) from None
        return p

    def generate(self, prompt_ids: list[int], params: SamplingParams, cancel: CancelToken | None = None,
                 sink: Any = None) -> Any:
        """Start a generation in the batch; returns its handle (TokenEvents, ``.result``)."""
        try:
            return self.scheduler.submit(prompt_ids, params, cancel, sink)
        except ValueError as e:
            raise ServiceError(str(e)) from None

    def run_task(self, request: TaskRequest, cancel: CancelToken | None = None) -> Iterator[Event]:
        """Events of a task (reasoning, answer, done/error), generated in the shared batch.
        Blocking; run it on a thread of its own."""
        from assistant import tasks

        cancel = cancel or CancelToken()
        try:
            yield from tasks.execute(self.engine, request, cancel)
        except Exception as e:  # noqa: BLE001 - reported as an event
            msg = str(e).strip().splitlines()
            yield Event("error", msg[0] if msg else type(e).__name__)

    def check_task(self, request: TaskRequest) -> None:
        """Raise :class:`ServiceError` for a request the tasks refuse (before streaming starts)."""
        from assistant import tasks

        try:
            tasks.make_plan(self.engine, request)
        except ValueError as e:
            raise ServiceError(str(e).splitlines()[0]) from None

    @property
    def health(self) -> dict:
        s = self.scheduler
        if s is None:
            return {"status": "follower"}
        return {"status": "error" if s.fatal else "ok", "error": s.fatal, "active": s.active, "queued": s.queued,
                "ep": self.ep, "steps": s.stats["steps"], "tokens": s.stats["tokens"],
                "finished": dict(s.stats["finished"]), "max_rows": s.stats["max_rows"]}

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


def fatal_exit(msg: str, code: int = 1) -> None:
    """End the process now with a one-line error (a lost rank must not leave a hung server)."""
    import os

    print(f"moecoder serve: error: {msg}", file=sys.stderr, flush=True)
    os._exit(code)
