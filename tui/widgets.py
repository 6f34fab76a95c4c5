"""Widgets of the chat: messages, an assistant turn (reasoning + answer), the prompt, the files panel."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Static, TextArea

from tui.api import Completion, DebugResult, Docstring, Explanation


def format_result(task: str, result: object, streamed: str) -> str:
    """The final Markdown of a turn from its result dataclass (``streamed`` if none fits)."""
    if isinstance(result, DebugResult):
        if not result.hints:
            return "No issue found."
        parts = []
        for h in result.hints:
            where = f"line {h.line + 1}" + (f" in `{h.function}`" if h.function else "")
            conf = f" _(confidence {h.confidence:.0%})_" if isinstance(h.confidence, int | float) else ""
            label = {"verified": " _[verified by running]_", "plausible": " _[plausible, not confirmed]_",
                     "runs": " _[from failing runs]_"}.get(
                h.evidence, "")
            parts.append(f"**{where}**{conf}{label}: {h.message}")
            if h.fix:
                parts.append(f"```python\n{h.fix}\n```")
        return "\n\n".join(parts)
    if isinstance(result, Docstring):
        return f"Docstring for `{result.function}`:\n\n```python\n{result.indent}{result.text.rstrip()}\n```"
    if isinstance(result, Completion):
        return f"```python\n{result.text.rstrip()}\n```" if result.text.strip() else "(no completion)"
    if isinstance(result, Explanation):
        return result.text or streamed
    return streamed


class UserMessage(Static):
    """What the user typed."""

    def __init__(self, text: str) -> None:
        super().__init__(Content(text), classes="user-message")
        self.text = text


class NoteMessage(Static):
    """A message from the app (help, errors, command results): Markdown-free, one block."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(Content(text), classes=f"note note-{kind}")
        self.text = text
        self.kind = kind


class HelpMessage(Markdown):
    def __init__(self, markdown: str) -> None:
        super().__init__(markdown, classes="note help")
        self.text = markdown


@dataclass
class TurnState:
    task: str
    reasoning: str = ""
    answer: str = ""
    status: str = "running"  # running | done | stopped | error
    order: list[str] = field(default_factory=list)  # event kinds in the order first shown


class AssistantTurn(Vertical):
    """One answer: a dim, collapsible reasoning block, then the answer as Markdown."""

    def __init__(
        self,
        task: str,
        reasoning: str = "",
        answer: str = "",
        status: str = "running",
        expand_reasoning: bool = False,
    ) -> None:
        super().__init__(classes="assistant-turn")
        self.state = TurnState(task=task, reasoning=reasoning, answer=answer, status=status)
        self._expand_reasoning = expand_reasoning
        self._stream = None
        self.finalized = status != "running"
        self.recorded = status != "running"  # saved into its conversation
        self.settled = status != "running"  # final answer rendered and saved
        self.conversation: object | None = None
        self._fence = task in ("complete", "comment")
        self._reasoning_text = Static(Content(reasoning), classes="reasoning-text")
        self.reasoning_block = Collapsible(
            self._reasoning_text,
            title=self._reasoning_title(reasoning, status == "running"),
            collapsed=status != "running" and not expand_reasoning,
            classes="reasoning",
        )
        self.reasoning_block.display = bool(reasoning) or status == "running"
        self.answer_view = Markdown(answer, classes="answer")
        self.status_line = Static(Content(self._status_text(status)), classes="turn-status")
        self.status_line.display = status != "done"

    def compose(self) -> ComposeResult:
        yield self.reasoning_block
        yield self.answer_view
        yield self.status_line

    @staticmethod
    def _reasoning_title(reasoning: str, running: bool) -> str:
        if running:
            return "Reasoning…"
        words = len(reasoning.split())
        return f"Reasoning ({words} word{'s' if words != 1 else ''})"

    @staticmethod
    def _status_text(status: str) -> str:
        return {"running": "thinking…", "stopped": "■ stopped", "error": "✗ error"}.get(status, "")

    @property
    def running(self) -> bool:
        return self.state.status == "running"

    def _mark(self, kind: str) -> None:
        if kind not in self.state.order:
            self.state.order.append(kind)

    def add_reasoning(self, text: str) -> None:
        # text queued before a stop still lands; nothing after the final render
        if self.finalized or not text:
            return
        self._mark("reasoning")
        self.state.reasoning += text
        self._reasoning_text.update(Content(self.state.reasoning))

    async def add_answer(self, text: str) -> None:
        if self.finalized or not text:
            return
        if self._stream is None:
            self._mark("answer")
            if not self._expand_reasoning:
                self.reasoning_block.collapsed = True
            self.reasoning_block.display = bool(self.state.reasoning)
            self.reasoning_block.title = self._reasoning_title(self.state.reasoning, False)
            if self.running:
                self.status_line.update(Content("answering…"))
            self._stream = Markdown.get_stream(self.answer_view)
            if self._fence:
                await self._stream.write("```python\n")
        self.state.answer += text
        await self._stream.write(text)

    def mark(self, status: str, message: str = "") -> None:
        """End the turn now (synchronous): ``done``, ``stopped`` or ``error``; later text is ignored."""
        if not self.running:
            return
        self.state.status = status
        text = self._status_text(status)
        if message:
            text = f"{text}: {message}" if text else message
        self.status_line.update(Content(text))
        self.status_line.display = bool(text)
        self.set_class(status == "stopped", "-stopped")
        self.set_class(status == "error", "-error")
        if not self._expand_reasoning and self.state.answer:
            self.reasoning_block.collapsed = True
        self.reasoning_block.display = bool(self.state.reasoning)
        self.reasoning_block.title = self._reasoning_title(self.state.reasoning, False)

    async def finalize(self, result: object | None = None) -> None:
        """After :meth:`mark`: close the Markdown stream and render the final answer (once)."""
        if self.running or self.finalized:
            return
        self.finalized = True
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.stop()
        final = self.state.answer
        if self.state.status == "done":
            final = format_result(self.state.task, result, self.state.answer)
        elif self._fence and final:
            final = f"```python\n{final}\n```"
        if final != self.state.answer or self._fence:
            await self.answer_view.update(final)
        self.state.answer = final

    def show_reasoning(self, show: bool) -> None:
        self._expand_reasoning = show
        if self.state.reasoning:
            self.reasoning_block.collapsed = not show


class PromptArea(TextArea):
    """Multi-line prompt: Enter sends, Ctrl+J (or Shift/Alt+Enter) adds a line, Up/Down recall history."""

    BINDINGS = [
        Binding("up", "cursor_up", "history up", show=False),
        Binding("down", "cursor_down", "history down", show=False),
    ]

    class Submitted(Message):
        def __init__(self, prompt: PromptArea, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

    def __init__(self, history: list[str] | None = None, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, highlight_cursor_line=False, **kwargs)
        self.prompt_history: list[str] = list(history or [])
        self._index: int | None = None  # position in history while browsing
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.remember(text)
                self.load_text("")
                self.post_message(self.Submitted(self, text))
            return
        if event.key in ("ctrl+j", "shift+enter", "alt+enter"):
            event.stop()
            event.prevent_default()
            if not self.read_only:
                self.replace("\n", *self.selection)
            return
        await super()._on_key(event)

    def remember(self, text: str) -> None:
        if not self.prompt_history or self.prompt_history[-1] != text:
            self.prompt_history.append(text)
        self._index = None
        self._draft = ""

    def _show(self, text: str, at_end: bool) -> None:
        self.load_text(text)
        if at_end:
            self.move_cursor(self.document.end)
        else:
            self.move_cursor((0, len(self.document.get_line(0))))

    def action_cursor_up(self, select: bool = False) -> None:
        row, _ = self.cursor_location
        if select or row > 0 or not self.prompt_history or self._index == 0:
            super().action_cursor_up(select)
            return
        if self._index is None:
            self._draft = self.text
            self._index = len(self.prompt_history) - 1
        else:
            self._index -= 1
        self._show(self.prompt_history[self._index], at_end=False)

    def action_cursor_down(self, select: bool = False) -> None:
        row, _ = self.cursor_location
        last = self.document.line_count - 1
        if select or row < last or self._index is None:
            super().action_cursor_down(select)
            return
        if self._index < len(self.prompt_history) - 1:
            self._index += 1
            self._show(self.prompt_history[self._index], at_end=True)
        else:
            self._index = None
            self._show(self._draft, at_end=True)


class FilesPanel(VerticalScroll):
    """Attached files and the context budget report."""

    def compose(self) -> ComposeResult:
        yield Static(Content("Files"), classes="panel-title")
        yield Static(Content("none attached\n/add PATH"), id="files-list")
        yield Static(Content(""), id="budget")

    def show(self, files: list[tuple[str, int | None]], budget_lines: list[str]) -> None:
        lst = self.query_one("#files-list", Static)
        if files:
            lines = []
            for path, tokens in files:
                lines.append(f"• {path}" + (f"\n  {tokens:,} tok" if tokens is not None else ""))
            lst.update(Content("\n".join(lines)))
        else:
            lst.update(Content("none attached\n/add PATH"))
        self.query_one("#budget", Static).update(Content("\n".join(budget_lines)))
