"""Deterministic stand-ins for the model side, for the assistant's tests.

``ScriptedBackend`` answers each prompt with ``script(task, code) -> (reasoning, answer)``
encoded with a real tokenizer, so the engine, tasks and review run their real code paths
on predictable model output. It counts the tokens it produced and where it saw a
cancellation, so tests can check "stops within one token".
"""

from __future__ import annotations

import itertools
import threading

from assistant.engine import Backend
from model.generate import GenerationResult, TokenEvent

TASK_IDS = ("comment", "debug", "explain")


class ScriptedBackend(Backend):
    def __init__(self, tok, script=None, context_length: int = 256, logprob=None, endless: bool = False,
                 interrupt_after_batches: int | None = None):
        self.tokenizer = tok
        self.context_length = context_length
        self.script = script or (lambda task, code: ("I looked at it.", "no issue"))
        self.logprob = logprob or (lambda piece: -0.5)
        self.endless = endless
        self.interrupt_after_batches = interrupt_after_batches
        self.batches = 0
        self.tokens = 0
        self.tokens_after_cancel = 0
        self.prompts: list[list[int]] = []
        self.lock = threading.Lock()

    # -- what the model "writes" --------------------------------------------------------
    def task_of(self, prompt_ids):
        tok = self.tokenizer
        first = prompt_ids[0]
        if first == tok.special_id("fim_prefix") or first == tok.special_id("fim_suffix"):
            return "complete", tok.decode(prompt_ids)
        for t in TASK_IDS:
            if first == tok.special_id(t):
                return t, tok.decode(prompt_ids[1:-1])
        return "unknown", tok.decode(prompt_ids)

    def output_ids(self, prompt_ids):
        tok = self.tokenizer
        task, code = self.task_of(prompt_ids)
        reasoning, answer = self.script(task, code)
        if task == "complete":
            return [*tok.encode(answer), tok.eos_id]
        return [*tok.encode(reasoning), tok.special_id("think_end"), *tok.encode(answer), tok.eos_id]

    # -- Backend ----------------------------------------------------------------------------
    def stream(self, prompt_ids, params, cancel):
        tok = self.tokenizer
        self.prompts.append(list(prompt_ids))
        ids = self.output_ids(prompt_ids)
        if self.endless:  # reasoning that never ends
            source = itertools.cycle(tok.encode(" and so on"))
        else:
            source = iter(ids[: params.max_new_tokens])
        cancelled_seen = False
        for t in source:
            # a real generator checks the token between steps; this one does not, so the
            # engine's own check is what is being tested
            if cancel is not None and cancel.cancelled:
                if cancelled_seen:
                    self.tokens_after_cancel += 1
                cancelled_seen = True
            with self.lock:
                self.tokens += 1
            text = "" if tok.is_special(t) else tok.decode([t])
            yield TokenEvent(t, text, self.logprob(text))
            if t == tok.eos_id:
                return

    def generate_batch(self, prompts, params, cancel=None):
        self.batches += 1
        if self.interrupt_after_batches is not None and self.batches > self.interrupt_after_batches:
            raise KeyboardInterrupt
        out = []
        tok = self.tokenizer
        for p in prompts:
            self.prompts.append(list(p))
            ids = self.output_ids(p)[: params.max_new_tokens]
            lps = [self.logprob(tok.decode([t])) for t in ids]
            out.append(GenerationResult(tok.decode(ids), ids, lps, "eos"))
        return out

    def token_logprobs(self, ids):
        tok = self.tokenizer
        return [0.0] + [self.logprob(tok.decode([t])) for t in ids[1:]]


AGREE_SOURCE = '''class Shape:
    def __init__(self, side):
        self.side = side

    def scale(self, k):
        return Shape(self.side - k)


def add(a, b):
    return a - b


def mul(a, b):
    return a * b
'''


class AgreeBackend(ScriptedBackend):
    """A deterministic model for the "faces agree" tests: it flags ``a - b`` (sure),
    ``self.side - k`` (sure) and ``a * b`` (unsure: below the default min-confidence)."""

    FLAGS = {"a - b": ("return a + b", True), "self.side - k": ("return Shape(self.side * k)", True),
             "a * b": ("return a * b * 1", False)}

    def __init__(self, tok):
        def script(task, code):
            for needle, (fix, _sure) in self.FLAGS.items():
                if needle in code and task == "debug":
                    n = next(i for i, ln in enumerate(code.split("\n"), 1) if needle in ln)
                    return f"Line {n} uses `{needle}`.", f"line {n}: `{needle}` looks wrong\nfix: {fix}"
            if task == "comment":
                return "It is a method.", "Scale the shape.\n\nArgs:\n    k: the factor."
            return "Takes a and b.", "no issue"

        super().__init__(tok, script, context_length=512)

    def next_token_logprobs(self, ids, candidates):
        prompt = self.tokenizer.decode(list(ids))
        sure = any(n in prompt and s for n, (_f, s) in self.FLAGS.items())
        return [0.0, -6.0] if sure else [-1.0, -1.0]
