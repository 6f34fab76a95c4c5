# Longer than 600 lines because the App's handlers share its state (turns, attachments,
# budget); commands, store, widgets and the assistant door are modules of their own.
"""`moecoder chat`: the Textual chat app.

The app talks to the model only through ``assistant`` (via :mod:`tui.api`): a turn is a
``TaskRequest`` streamed by ``Engine.stream`` on a thread worker; events come back to the
UI with ``call_from_thread``. Escape cancels the engine's ``CancelToken``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from textual import events, on
from textual.actions import SkipAction
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header

from tui import api
from tui.args import HELP_EPILOG, build_parser  # noqa: F401  (light: `moecoder chat --help` imports only it)
from tui.commands import (
    Attachment,
    CommandError,
    find_attachment,
    find_function,
    help_markdown,
    parse_command,
    parse_file_line,
    parse_line_range,
    read_attachment,
    route_free_text,
)
from tui.store import Conversation, Store, Turn
from tui.widgets import AssistantTurn, FilesPanel, HelpMessage, NoteMessage, PromptArea, UserMessage

EngineFactory = Callable[[str | None], api.Engine]  # model dir (None: the configured one) -> engine

DRAIN_INTERVAL = 1 / 30  # seconds between UI updates from a streaming answer
WELCOME = "Ask about code, or attach a file with /add PATH. /help lists the commands."


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else type(e).__name__
    return msg if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {msg}"


def shorten(path: str, width: int = 24) -> str:
    """A path cut from the left to ``width`` characters (``…/weights/small``)."""
    return path if len(path) <= width else "…" + path[-(width - 1) :]


class ChatApp(App):
    """The chat: conversation on the left, attached files and budget on the right."""

    CSS_PATH = "chat.tcss"
    TITLE = "moecoder chat"
    AUTO_FOCUS = "#prompt"  # keys go to the prompt from the first frame, not to the conversation
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        # one key, two labels: the footer says what Ctrl+R does now (no pop-up to linger)
        Binding("ctrl+r", "show_reasoning", "Show reasoning"),
        Binding("ctrl+r", "fold_reasoning", "Fold reasoning"),
        Binding("ctrl+b", "toggle_files", "Files"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        *,
        engine: api.Engine | None = None,
        engine_factory: EngineFactory | None = None,
        model_dir: str | None = None,
        files: Sequence[str] = (),
        resume: bool = False,
        data_dir: Path | None = None,
        cwd: Path | None = None,
        clock: Callable[[], float] = time.time,
        max_file_bytes: int | None = None,
        max_new_tokens: int | None = None,
        policy: api.Policy | None = None,
    ) -> None:
        super().__init__()
        self._policy = policy or api.Policy()  # which debug hints to show: as review and lsp
        self._engine = engine
        self._owns_engine = engine is None  # engines the app loads itself, it closes at exit
        self._factory: EngineFactory = engine_factory or api.load_engine
        self._model_dir = model_dir
        self._engine_lock = threading.Lock()
        self._model_label = "engine ready" if engine is not None else "loading model…"
        self._initial_files = list(files)
        self._resume = resume
        self.store = Store(data_dir)
        self.cwd = cwd or Path.cwd()
        self.clock = clock
        self._max_file_bytes = max_file_bytes
        self._max_new_tokens = max_new_tokens
        self.conversation = Conversation.new(clock)
        self.attachments: list[Attachment] = []
        self.show_reasoning = False
        self.current: AssistantTurn | None = None
        self._cancel: api.CancelToken | None = None
        self._budget_lines: list[str] = []
        self._load_failed = False
        self._events: deque[tuple[AssistantTurn, str, str, object, str]] = deque()
        self._file_tokens: dict[str, int] = {}
        self._budget_seq = 0
        # keys (and pastes) that come before the prompt is up, replayed into it at the end of
        # on_mount: a terminal delivers what was typed while the app started all at once
        self._early_input: list[events.Key | events.Paste] | None = []

    # -- layout ---------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            with Vertical(id="main"):
                yield VerticalScroll(id="conversation")
                yield PromptArea(id="prompt", placeholder="Ask, or /help  (Enter send, Ctrl+J new line)")
            yield FilesPanel(id="files")
        yield Footer()

    @property
    def conv_view(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    @property
    def prompt(self) -> PromptArea:
        return self.query_one("#prompt", PromptArea)

    async def on_mount(self) -> None:
        self._drain_timer = self.set_interval(DRAIN_INTERVAL, self._drain, pause=True)
        self.sub_title = self._model_label
        self.conv_view.anchor()
        self.prompt.focus()
        if self._resume:
            await self._resume_last()
        else:
            await self._note(WELCOME)
        for f in self._initial_files:
            await self._attach(f)
        if self._engine is None:
            self.run_worker(self._load_initial, thread=True, group="load", exit_on_error=False)
        self._refresh_files()
        await self._replay_early_input()

    async def on_event(self, event: events.Event) -> None:
        if (self._early_input is not None and isinstance(event, events.Key | events.Paste)
                and not event.is_forwarded):
            self._early_input.append(event)  # the prompt is not up yet: kept, not lost
            return
        await super().on_event(event)

    async def _replay_early_input(self) -> None:
        """Hand the input typed during start-up to the prompt, in order, before any later key
        (the app's own queue waits while this runs)."""
        self.screen.set_focus(self.prompt)
        early, self._early_input = self._early_input or [], None
        for ev in early:
            await self.on_event(events.Key(ev.key, ev.character) if isinstance(ev, events.Key)
                                else events.Paste(ev.text))

    # -- messages into the conversation -----------------------------------------------
    async def _note(self, text: str, kind: str = "info", save: bool = True) -> None:
        await self.conv_view.mount(NoteMessage(text, kind))
        if save:
            self.conversation.turns.append(Turn(role="note", text=text, status=kind))

    async def _error(self, text: str) -> None:
        await self._note(text, "error")

    def _save(self, conv: Conversation | None = None) -> None:
        """Save the conversation (once it has a question in it; app notes alone are not kept)."""
        conv = conv or self.conversation
        if not any(t.role == "user" for t in conv.turns):
            return
        conv.updated = self.clock()
        if conv is not self.conversation:  # a turn of a conversation left with /clear
            self._write(conv)
            return
        conv.history = list(self.prompt.prompt_history[-200:])
        conv.attachments = [a.path for a in self.attachments]
        conv.attachments_abs = [
            str((self.cwd / Path(a.path).expanduser()).resolve()) for a in self.attachments
        ]
        self._write(conv)

    def _write(self, conv: Conversation) -> None:
        try:
            self.store.save(conv)
        except OSError as e:
            self.notify(f"could not save the conversation: {one_line(e)}", severity="error")

    # -- the engine -------------------------------------------------------------------
    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the UI thread from a worker (ignored once the app is gone)."""
        try:
            self.call_from_thread(fn, *args)
        except RuntimeError:
            pass

    def _engine_or_load(self) -> api.Engine:
        with self._engine_lock:
            if self._engine is None:
                self._engine = self._factory(self._model_dir)
            return self._engine

    def _load_initial(self) -> None:
        try:
            engine = self._engine_or_load()
        except Exception as e:  # noqa: BLE001 - shown in the chat
            self._post(self._loaded, None, one_line(e))
            return
        self._post(self._loaded, engine, "")

    async def _loaded(self, engine: api.Engine | None, error: str) -> None:
        if engine is None:
            self._model_label = "no model"
            self.sub_title = self._model_label
            self._load_failed = True
            self._update_budget()
            await self._error(f"could not load the model: {error}. Use /model PATH to load a checkpoint.")
            return
        self._model_label = f"model ready · context {engine.context_length:,}"
        self.sub_title = self._model_label
        self._update_budget()

    def _switch_model(self, path: str) -> None:
        """Thread worker: load ``path``, then swap it in (the UI thread never waits on a load)."""
        try:
            engine = self._factory(path)
        except Exception as e:  # noqa: BLE001 - shown in the chat
            self._post(self._model_switched, None, path, one_line(e))
            return
        with self._engine_lock:
            old, self._engine = self._engine, engine
            owned, self._owns_engine = self._owns_engine, True
        if owned and old is not None:
            old.close()
        self._post(self._model_switched, engine, path, "")

    async def _model_switched(self, engine: api.Engine | None, path: str, error: str) -> None:
        if engine is None:
            self.sub_title = self._model_label
            await self._error(f"could not load model {path}: {error}")
            return
        self._model_dir = path
        self._load_failed = False
        self.conversation.model = path
        self._model_label = f"model {shorten(path)} · context {engine.context_length:,}"
        self.sub_title = self._model_label
        await self._note(f"loaded model {path}")
        self._update_budget()

    # -- turns ------------------------------------------------------------------------
    async def _start_turn(self, request: api.TaskRequest) -> None:
        turn = AssistantTurn(request.task, expand_reasoning=self.show_reasoning)
        turn.conversation = self.conversation
        await self.conv_view.mount(turn)
        cancel = api.CancelToken()
        self.current, self._cancel = turn, cancel
        self._drain_timer.resume()
        self.run_worker(
            lambda: self._generate(turn, request, cancel), thread=True, group="generate", exit_on_error=False
        )

    def _generate(self, turn: AssistantTurn, request: api.TaskRequest, cancel: api.CancelToken) -> None:
        """Thread worker: stream the engine's events into the queue the UI drains."""
        emit = self._emit
        try:
            engine = self._engine_or_load()
        except Exception as e:  # noqa: BLE001
            emit(turn, "error", message=f"no model: {one_line(e)}")
            return
        if cancel.cancelled:  # stopped while the model was loading
            return
        events = request.stream(engine, cancel) if isinstance(request, api.RunDebugRequest) \
            else api.stream_turn(engine, request, cancel, self._policy)
        try:
            for ev in events:
                if cancel.cancelled:
                    break
                if ev.kind in ("reasoning", "answer"):
                    emit(turn, ev.kind, text=ev.text)
                elif ev.kind == "done":
                    emit(turn, "done", result=ev.result)
                    return
                elif ev.kind == "error":
                    emit(turn, "error", message=ev.text)
                    return
        except Exception as e:  # noqa: BLE001
            emit(turn, "error", message=one_line(e))
            return
        finally:
            events.close()
        if cancel.cancelled:
            emit(turn, "stopped")
        else:
            emit(turn, "error", message="the engine ended without an answer")

    def _emit(
        self, turn: AssistantTurn, kind: str, text: str = "", result: object = None, message: str = ""
    ) -> None:
        """From any thread: queue an engine event for the UI (never blocks the engine)."""
        self._events.append((turn, kind, text, result, message))  # deque.append is thread-safe

    async def _drain(self) -> None:
        """UI timer: apply queued events, joining runs of text so a fast model costs few repaints."""
        if not self._events:
            if self.current is None:
                self._drain_timer.pause()
            return
        batch = []
        while self._events:
            batch.append(self._events.popleft())
        i = 0
        while i < len(batch):
            turn, kind, _, result, message = batch[i]
            j = i + 1
            try:
                if kind in ("reasoning", "answer"):
                    while j < len(batch) and batch[j][0] is turn and batch[j][1] == kind:
                        j += 1
                    if not turn.is_attached:  # removed by /clear
                        continue
                    text = "".join(b[2] for b in batch[i:j])
                    if kind == "reasoning":
                        turn.add_reasoning(text)
                    else:
                        await turn.add_answer(text)
                else:
                    await self._finish(turn, kind, result, message)
            except Exception as e:  # noqa: BLE001 - a display problem must not end the chat
                self.notify(f"display error: {one_line(e)}", severity="error")
            finally:
                i = j

    async def _finish(self, turn: AssistantTurn, status: str, result: object, message: str) -> None:
        """End a turn (from the drain): mark it, render its final answer, save it — once."""
        if turn.recorded:
            return
        if turn.running:
            if turn is self.current:
                self.current, self._cancel = None, None
            turn.mark(status, message)
        turn.recorded = True
        if turn.is_attached:
            await turn.finalize(result)
        conv = turn.conversation if isinstance(turn.conversation, Conversation) else self.conversation
        conv.turns.append(
            Turn(
                role="assistant",
                text=turn.state.answer,
                reasoning=turn.state.reasoning,
                task=turn.state.task,
                status=turn.state.status,
            )
        )
        self._save(conv)
        turn.settled = True

    def action_stop(self) -> None:
        """Escape: stop the running answer at once (the engine sees the cancel token)."""
        if self.current is None or self._cancel is None or len(self.screen_stack) > 1:
            raise SkipAction()  # nothing to stop, or a dialog (command palette) wants the key
        turn = self.current
        self._cancel.cancel()
        self.current, self._cancel = None, None
        turn.mark("stopped")  # shown now; the drain closes its stream and saves it
        self._emit(turn, "stopped")
        self._drain_timer.resume()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "show_reasoning":
            return not self.show_reasoning  # False: the binding is hidden and Ctrl+R goes on to the next
        if action == "fold_reasoning":
            return self.show_reasoning
        return True

    def action_show_reasoning(self) -> None:
        self._set_reasoning(True)

    def action_fold_reasoning(self) -> None:
        self._set_reasoning(False)

    def action_toggle_reasoning(self) -> None:
        self._set_reasoning(not self.show_reasoning)

    def _set_reasoning(self, show: bool) -> None:
        """Show or fold every turn's reasoning. The footer's Ctrl+R label says which is next;
        no pop-up to outlive its time over the prompt (#20: one stayed painted 17 s)."""
        self.show_reasoning = show
        for turn in self.query(AssistantTurn):
            if not turn.running or show:
                turn.show_reasoning(show)
        self.refresh_bindings()

    def action_toggle_files(self) -> None:
        panel = self.query_one(FilesPanel)
        panel.display = not panel.display

    async def action_quit(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
        self.exit()

    def on_unmount(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
        if self._owns_engine and self._engine is not None:
            self._engine.close()

    # -- input ------------------------------------------------------------------------
    @on(PromptArea.Submitted)
    async def _submitted(self, message: PromptArea.Submitted) -> None:
        text = message.text.strip("\n")
        await self.handle_input(text)

    async def handle_input(self, text: str) -> None:
        if not text.strip():
            return
        if text.lstrip().startswith("/"):
            try:
                await self._command(text.strip())
            except CommandError as e:
                await self._error(str(e))
            self._save()
            return
        if self.current is not None:
            await self._error("still answering; press Esc to stop it first")
            return
        await self.conv_view.mount(UserMessage(text))
        self.conversation.turns.append(Turn(role="user", text=text))
        self._refresh_attachments()
        task, att, func = route_free_text(text, self.attachments)
        if att is None:
            request = api.TaskRequest(task="explain", source=text, max_new_tokens=self._max_new_tokens)
        else:  # the question goes with the request: the model reads it with the code
            request = self._request(task, att, function=func, question=text)
        self._save()
        await self._start_turn(request)

    def _refresh_attachments(self) -> None:
        """Files edited since they were attached are read again before a request."""
        kwargs = {} if self._max_file_bytes is None else {"max_bytes": self._max_file_bytes}
        if any([a.refresh(**kwargs) for a in self.attachments]):
            self._update_budget()

    def _request(self, task: str, att: Attachment, **kwargs: Any) -> Any:
        related = [(a.path, a.text) for a in self.attachments if a is not att]
        return api.TaskRequest(
            task=task,
            source=att.text,
            path=att.path,
            related=related,
            max_new_tokens=self._max_new_tokens,
            **kwargs,
        )

    def _last_attachment(self, what: str) -> Attachment:
        if not self.attachments:
            raise CommandError(f"{what} needs an attached file: /add PATH first")
        return self.attachments[-1]

    async def _command(self, text: str) -> None:
        cmd = parse_command(text)
        name, args = cmd.name, cmd.args
        if name == "help":
            await self.conv_view.mount(HelpMessage(help_markdown()))
            return
        if name == "add":
            if not args:
                raise CommandError("usage: /add PATH")
            for a in args:
                await self._attach(a)
            return
        if name == "drop":
            if not args:
                raise CommandError("usage: /drop PATH")
            for a in args:
                att = find_attachment(self.attachments, a)
                if att is None:
                    raise CommandError(f"{a} is not attached (see /files)")
                self.attachments.remove(att)
                await self._note(f"dropped {att.path}")
            self._refresh_files()
            self._update_budget()
            return
        if name == "files":
            if not self.attachments:
                await self._note("no files attached; /add PATH")
                return
            lines = [f"{a.path}  ({self._file_tokens.get(a.path, '?')} tokens)" for a in self.attachments]
            await self._note("\n".join(lines + self._budget_lines))
            return
        if name == "clear":
            if self._cancel is not None:
                self.action_stop()
            self._save()
            await self.conv_view.remove_children()
            self.conversation = Conversation.new(self.clock)
            await self._note(
                "new conversation (the previous one is saved; `moecoder chat --resume` reopens the last)"
            )
            return
        if name == "model":
            if len(args) != 1:
                raise CommandError("usage: /model PATH (a checkpoint directory)")
            path = Path(args[0]).expanduser()
            if not path.is_absolute():
                path = self.cwd / path
            if not path.exists():
                raise CommandError(f"no such model directory: {args[0]}")
            if not path.is_dir():
                raise CommandError(f"{args[0]} is not a checkpoint directory")
            self.sub_title = f"loading {path.name}…"
            await self._note(f"loading model {args[0]} …")
            self.run_worker(
                lambda: self._switch_model(str(path)), thread=True, group="load", exit_on_error=False
            )
            return
        # the tasks
        if self.current is not None:
            raise CommandError("still answering; press Esc to stop it first")
        self._refresh_attachments()
        if name == "complete":
            if len(args) != 1:
                raise CommandError("usage: /complete FILE:LINE")
            path, line = parse_file_line(args[0])
            att = find_attachment(self.attachments, path) or await self._attach(path)
            if att is None:
                return
            lines = att.text.split("\n")
            if line > len(lines):
                raise CommandError(f"{path} has only {len(lines)} lines")
            request = self._request("complete", att, line=line - 1, column=len(lines[line - 1]))
        elif name == "comment":
            if len(args) != 1:
                raise CommandError("usage: /comment FUNC (a name or Class.method)")
            att = find_function(self.attachments, args[0])
            if att is None:
                raise CommandError(f"no attached file defines {args[0]}(); /add the file first")
            request = self._request("comment", att, function=args[0])
        elif name == "debug" and "--run" in args:
            rest = [a for a in args if a != "--run"]
            if len(rest) > 1:
                raise CommandError("usage: /debug --run [FUNC]")
            att = find_function(self.attachments, rest[0]) if rest else self._last_attachment("/debug --run")
            if att is None:
                raise CommandError(f"no attached file defines {rest[0]}(); /add the file first")
            request = api.RunDebugRequest(att.text, str(att.file), list(rest))
        elif name == "debug":
            if len(args) > 1:
                raise CommandError("usage: /debug [--run] [FUNC]")
            if args:
                att = find_function(self.attachments, args[0])
                if att is None:
                    raise CommandError(f"no attached file defines {args[0]}(); /add the file first")
                request = self._request("debug", att, function=args[0])
            else:
                request = self._request("debug", self._last_attachment("/debug"))
        elif name == "explain":
            if len(args) > 1:
                raise CommandError("usage: /explain [FILE[:A-B]]")
            if args:
                path, a, b = parse_line_range(args[0])
                att = find_attachment(self.attachments, path) or await self._attach(path)
                if att is None:
                    return
                if a is None:
                    request = self._request("explain", att)
                else:
                    request = self._request("explain", att, line=a - 1, end_line=(b or a) - 1)
            else:
                request = self._request("explain", self._last_attachment("/explain"))
        else:  # pragma: no cover - parse_command knows every name
            raise CommandError(f"unknown command /{name}")
        await self.conv_view.mount(UserMessage(text))
        self.conversation.turns.append(Turn(role="user", text=text))
        await self._start_turn(request)

    # -- attachments ------------------------------------------------------------------
    async def _attach(self, path: str) -> Attachment | None:
        try:
            kwargs = {} if self._max_file_bytes is None else {"max_bytes": self._max_file_bytes}
            att = read_attachment(path, base=self.cwd, **kwargs)
        except CommandError as e:
            await self._error(str(e))
            return None
        old = find_attachment(self.attachments, att.path)
        if old is not None and old.path == att.path:
            self.attachments.remove(old)
        self.attachments.append(att)
        await self._note(f"attached {att.path} ({len(att.text.splitlines())} lines)")
        self._refresh_files()
        self._update_budget()
        return att

    def _refresh_files(self) -> None:
        files = [(a.path, self._file_tokens.get(a.path)) for a in self.attachments]
        self.query_one(FilesPanel).show(files, self._budget_lines)

    def _update_budget(self) -> None:
        self._budget_seq += 1  # reports of earlier file sets are stale from now on
        seq = self._budget_seq
        if not self.attachments:
            self._budget_lines = []
            self._refresh_files()
            return
        if self._engine is None:
            self._budget_lines = [
                "budget: no model loaded" if self._load_failed else "budget: waiting for the model"
            ]
            self._refresh_files()
            return
        engine = self._engine
        snapshot = [(a.path, a.text) for a in self.attachments]
        self.run_worker(
            lambda: self._budget_worker(engine, snapshot, seq),
            thread=True,
            group="budget",
            exclusive=True,
            exit_on_error=False,
        )

    def _budget_worker(self, engine: api.Engine, files: list[tuple[str, str]], seq: int) -> None:
        try:
            report = api.budget_report(engine, files)
        except Exception as e:  # noqa: BLE001 - shown in the panel
            self._post(self._budget_done, seq, {}, [f"budget: {one_line(e)}"])
            return
        lines = ["Context budget", f"{report.used_tokens:,} / {report.budget:,} tokens"]
        width = 20
        filled = min(width, round(width * report.used_tokens / max(1, report.budget)))
        lines.append("█" * filled + "░" * (width - filled))
        reserve = report.context_length - report.budget
        if reserve > 0:
            lines.append(f"({report.context_length:,} − {reserve:,} answer)")
        if report.trimmed:
            lines.append("trimmed:")
            lines += [f"- {t}" for t in report.trimmed]
        else:
            lines.append("nothing trimmed")
        self._post(self._budget_done, seq, dict(report.file_tokens), lines)

    def _budget_done(self, seq: int, file_tokens: dict[str, int], lines: list[str]) -> None:
        if seq != self._budget_seq:  # an older report finished late: the files changed since
            return
        self._file_tokens = file_tokens
        self._budget_lines = lines
        self._refresh_files()

    # -- resume -----------------------------------------------------------------------
    async def _resume_last(self) -> None:
        conv = self.store.latest()
        if conv is None:
            await self._note("no saved conversation to resume; starting a new one. " + WELCOME)
            return
        self.conversation = conv
        self.prompt.prompt_history = list(conv.history)
        for t in conv.turns:
            if t.role == "user":
                await self.conv_view.mount(UserMessage(t.text))
            elif t.role == "assistant":
                await self.conv_view.mount(
                    AssistantTurn(t.task, t.reasoning, t.text, status=t.status, expand_reasoning=False)
                )
            else:
                await self.conv_view.mount(
                    NoteMessage(t.text, t.status if t.status in ("info", "error") else "info")
                )
        await self._note(f"resumed conversation {conv.id}", save=False)
        for i, path in enumerate(conv.attachments):
            resolved = conv.attachments_abs[i] if i < len(conv.attachments_abs) else path
            here = (self.cwd / Path(path).expanduser()).resolve()
            # the path as typed when it still names the same file from here, else the absolute one
            await self._attach(path if str(here) == resolved or not Path(resolved).exists() else resolved)


def main(argv: Sequence[str] | None = None, engine: api.Engine | None = None,
         engine_factory: EngineFactory | None = None) -> int:
    """``moecoder chat``; ``engine``/``engine_factory`` are for tests (a scripted engine)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    if args.model is not None and not Path(args.model).expanduser().is_dir():
        print(f"moecoder chat: error: --model {args.model}: no such checkpoint directory", file=sys.stderr)
        return 2
    for f in args.files:  # the same reader as /add: a missing, binary or special file is one line, exit 2
        try:
            read_attachment(f, base=Path.cwd())
        except CommandError as e:
            print(f"moecoder chat: error: {e}", file=sys.stderr)
            return 2
    try:
        config = api.face_settings("chat", args.server)
    except ValueError as e:
        print(f"moecoder chat: error: {one_line(e)}", file=sys.stderr)
        return 2
    app = ChatApp(engine=engine, engine_factory=engine_factory or api.engine_factory(config, args.device),
                  model_dir=args.model or config.model, files=args.files, resume=args.resume,
                  policy=api.Policy.from_settings(config))
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
