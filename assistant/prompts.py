"""Prompting by model family: the one place that knows which kind of checkpoint it talks to.

Three kinds, told apart by the tokenizer (``kind``):

* ``moecoder`` — our own model: the task formats of :mod:`model.formats` (special task
  tokens, reasoning until ``<|/think|>``).
* ``chat`` — an open checkpoint with a chat template: comment/debug/explain become a user
  message rendered with the checkpoint's own template. A model that thinks natively
  (``<think>...</think>``, as Qwen3) streams its thinking as the reasoning events; any other
  is asked to reason first and then write ``ANSWER:`` and the answer, and the text before
  the marker streams as reasoning (:class:`MarkerSplitter`).
* ``plain`` — an open checkpoint without a chat template (a base model): the same
  instruction as plain text, then ``Reasoning:``.

Completion needs no prompt here: the context manager builds FIM prompts from the
tokenizer's FIM tokens, or a prefix-only prompt when it has none (``has_fim``).
"""

from __future__ import annotations

from typing import Any

ANSWER_MARKER = "ANSWER:"

INSTRUCTIONS = {
    "comment": ("Write a docstring for this Python function: a one-line summary, then its parameters, "
                "what it returns and what it raises. Give only the docstring text, without quotes or code."),
    "debug": ("The lines of this Python code are numbered. Find the most likely bug. Answer exactly "
              "`line N: <short hint>` and on the next line `fix: <the corrected line>`, or `no issue` if "
              "the code is correct."),
    "explain": "Explain what this code does and how, briefly, for a programmer reading it.",
}


def kind(tok: Any) -> str:
    """``moecoder`` | ``chat`` | ``plain`` (see the module docstring)."""
    if not hasattr(tok, "render_chat"):
        return "moecoder"
    return "chat" if getattr(tok, "chat_template", None) else "plain"


def native_think(tok: Any) -> bool:
    """An open checkpoint whose vocabulary has ``<think>``/``</think>`` (it reasons natively)."""
    return kind(tok) != "moecoder" and bool(getattr(tok, "has_special", lambda _n: False)("think_end"))


def think_end_id(tok: Any) -> int | None:
    """The token that ends the reasoning, or None (the answer marker or no reasoning)."""
    if kind(tok) != "moecoder" and not native_think(tok):
        return None
    try:
        return tok.special_id("think_end")
    except KeyError:
        return None


def answer_marker(tok: Any) -> str | None:
    """The text that separates reasoning from answer for models that do not think natively."""
    return None if kind(tok) == "moecoder" or native_think(tok) else ANSWER_MARKER


def task_prompt(tok: Any, task: str, code: str) -> list[int]:
    """Prompt ids for comment/debug/explain in the model's own format."""
    k = kind(tok)
    if k == "moecoder":
        from model.formats import task_prompt as ours

        return ours(tok, task, code)
    text = f"{INSTRUCTIONS[task]}\n\n```python\n{code}\n```"
    if not native_think(tok):
        text += f"\n\nFirst reason step by step. Then write a line `{ANSWER_MARKER}` followed by the answer only."
    if k == "chat":
        rendered = tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
        if native_think(tok) and not rendered.rstrip().endswith("<think>"):
            rendered += "<think>\n"  # make the thinking explicit: the reasoning events start at once
        return tok.encode_with_specials(rendered)
    return tok.encode(text + "\n\nReasoning:")


def fim_stop_ids(tok: Any) -> tuple[int, ...]:
    """Tokens that end a completion: FIM markers and file separators the tokenizer has, and
    its end-of-text / end-of-turn tokens."""
    from model.generate import fim_stop_ids as markers

    return tuple(dict.fromkeys([*markers(tok), *getattr(tok, "stop_ids", ())]))


class MarkerSplitter:
    """Streams text before ``marker`` as reasoning and after it as answer; never emits a
    partial marker (text that could start the marker is held back until it cannot)."""

    def __init__(self, marker: str):
        self.marker, self.held, self.in_answer = marker, "", False
        self._lead = True  # the spaces right after the marker are not part of the answer

    def _answer(self, text: str) -> list[tuple[str, str]]:
        if self._lead:
            text = text.lstrip(" ")
            self._lead = not text
        return [("answer", text)] if text else []

    def push(self, text: str) -> list[tuple[str, str]]:
        if self.in_answer:
            return self._answer(text)
        buf = self.held + text
        i = buf.find(self.marker)
        if i >= 0:
            self.in_answer, self.held = True, ""
            before = [("reasoning", buf[:i])] if i else []
            return before + self._answer(buf[i + len(self.marker):])
        keep = 0
        for n in range(min(len(self.marker) - 1, len(buf)), 0, -1):
            if buf.endswith(self.marker[:n]):
                keep = n
                break
        self.held = buf[len(buf) - keep:] if keep else ""
        out = buf[:len(buf) - keep]
        return [("reasoning", out)] if out else []

    def flush(self) -> list[tuple[str, str]]:
        held, self.held = self.held, ""
        return [("answer" if self.in_answer else "reasoning", held)] if held else []


def split_text(text: str, marker: str) -> tuple[str, str]:
    """(reasoning, answer) of a finished generation; all answer when the marker is missing."""
    i = text.find(marker)
    if i < 0:
        return "", text
    return text[:i], text[i + len(marker):].lstrip(" ")
