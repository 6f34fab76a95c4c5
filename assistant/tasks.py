# Longer than 600 lines because the four tasks share one plan/execute/batch road and the
# debug confidence (gate, consistency checks); split along those seams (complete, function tasks,
# debug scoring) once the debugging work in flight (#19) lands.
"""The four tasks: complete, comment, debug, explain — request -> prompt -> events -> result.

Every task goes through the model's task formats (:mod:`model.formats`):

* ``complete`` — fill-in-the-middle around the cursor with the context manager
  (:func:`assistant.context.build_context`); single- or multi-line from the syntax at the
  cursor; post-filters cut where the completion starts repeating the suffix, where it
  loops, where a bracket would close something it did not open, and where it leaves the
  indentation block. No reasoning.
* ``comment`` — ``<|comment|> code <|think|>``: reasoning, ``<|/think|>``, a docstring; the
  docstring is re-rendered in the file's style (Google / NumPy / reST / plain) with the
  function's real parameters, returns and raises.
* ``debug`` — ``<|debug|> numbered code <|think|>``: reasoning, then ``line N: hint`` /
  ``fix: ...`` or ``no issue``. The confidence of a finding is calibrated from the model's
  decision at its first reasoning token (P("Line ...") vs P("Takes ..."), see
  ``debug_gate_score``) times consistency checks of the answer against the code.
* ``explain`` — ``<|explain|> code <|think|>``: reasoning, then the explanation.

The model is small and may write garbage: answers are parsed defensively (an unparseable
answer gives no finding or a low-confidence one, never an exception).

``main(argv)`` is the ``moecoder complete|comment|debug|explain`` command.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from assistant import code as codemod
from assistant import prompts
from model import docstrings
from model.docstrings import DocParts

if TYPE_CHECKING:  # tasks run inside the in-process engine (its worker thread)
    from assistant.engine import Engine
    from assistant.protocols import CancelToken, Event

TASKS = ("complete", "comment", "debug", "explain")
DEFAULT_MAX_NEW = {"complete": 64, "comment": 160, "debug": 160, "explain": 160}


@dataclass
class TaskRequest:
    """One request. Lines and columns are 0-based (``line`` is the cursor for ``complete``,
    the target line for the others; ``end_line`` is inclusive)."""

    task: str  # "complete" | "comment" | "debug" | "explain"
    source: str
    path: str | None = None
    line: int = 0
    column: int = 0
    end_line: int | None = None
    function: str | None = None
    related: list[tuple[str, str]] = field(default_factory=list)
    max_new_tokens: int | None = None
    max_seconds: float | None = None
    context_tokens: int | None = None  # complete: prompt cap (default: the engine's completion_context_tokens)
    question: str | None = None  # the user's words (chat): explain reads them with the code
    repo: str | None = None  # project root: completion reads the project's memory (assistant/memory.py)
    recent: list[str] | None = None  # recently edited files of the project, most recent first
    # with ``repo``: at most this long reading the project into its memory (assistant/memory.py) per
    # request, the rest at later ones (an editor's first completions must not wait); None: all first;
    # negative: never read here, use what was read already (the language server reads while idle)
    repo_read_s: float | None = None
    # debug on the batch road (the review): hints below this confidence are not wanted, so a
    # function whose debug gate alone already puts any hint below it is not generated for
    min_confidence: float | None = None


@dataclass
class Completion:
    """The text to insert at the cursor, after the post-filters (the ``answer`` events of
    a completion stream the raw model text before filtering)."""

    text: str
    multiline: bool
    reasoning: str = ""


@dataclass
class Docstring:
    """``text`` is the full docstring literal (quotes included, continuation lines already
    indented); insert ``indent + text + "\\n"`` before 0-based ``insert_line``. When the
    function already has a docstring, ``replace_start``/``replace_end`` (0-based, inclusive)
    are the lines it occupies."""

    function: str
    text: str
    insert_line: int
    indent: str
    style: str  # "google" | "numpy" | "rest" | "plain"
    reasoning: str
    replace_start: int | None = None
    replace_end: int | None = None


@dataclass
class Hint:
    """A debugging hint. ``line`` is 0-based in the file; ``fix`` is the full replacement
    line (original indentation kept) or None; ``confidence`` in [0, 1]."""

    path: str | None
    function: str
    line: int
    message: str
    fix: str | None
    confidence: float
    reasoning: str
    evidence: str = "model"  # "model": the model alone; "runs": failing runs point here; "verified": a fix passed them;
    # "plausible": a fix passed them, but so did rival fixes that behave differently elsewhere


@dataclass
class DebugResult:
    hints: list[Hint]
    reasoning: str


@dataclass
class Explanation:
    text: str
    reasoning: str


class TaskError(ValueError):
    """A request that cannot be served (unknown task, no such function...); one line."""


# ------------------------------------------------------------------------- plans
@dataclass
class Generated:
    """What the model wrote for one request, split at ``<|/think|>``."""

    reasoning: str
    answer: str
    answer_logprobs: list[float]
    finish_reason: str


@dataclass
class Plan:
    request: TaskRequest
    prompt_ids: list[int]
    max_new_tokens: int
    think: bool  # the output starts with reasoning until <|/think|>
    finish: Callable[[Any, Generated], object]  # (engine, generated) -> result; runs on the worker
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)  # what the context manager trimmed
    # (first, n): the reasoning's "line N" counts from file line ``first`` over ``n`` lines;
    # streamed reasoning is rewritten to the file's numbers (:func:`file_line_numbers`)
    reasoning_lines: tuple[int, int] | None = None
    # open checkpoints that do not think natively: reasoning until this text (assistant.prompts)
    answer_marker: str | None = None
    loop_guard: int = 0  # SamplingParams.loop_guard: prose tasks never repeat a unit three times in a row
    heal: str = ""  # SamplingParams.heal: token healing of the word at the cursor (completion)
    beams: int = 1  # SamplingParams.beams: beam search (single-line completion)
    rerank: Callable[[Any, list[list[int]]], list[float]] | None = None  # SamplingParams.rerank (beams)
    mix: Callable[[Any, Any], Any] | None = None  # SamplingParams.mix: the repository's memory (completion)
    # batch road: run before generation (on the worker); a result here is final, nothing is generated
    pregate: Callable[[Any], object | None] | None = None


def _budget(engine: Engine, max_new: int) -> tuple[int, int]:
    """(prompt budget, max new tokens) within the model's context length."""
    ctx = engine.context_length
    max_new = max(1, min(max_new, ctx // 2))
    return ctx - max_new - 1, max_new


def make_plan(engine: Engine, req: TaskRequest) -> Plan:
    """Prompt, limits and result parser for ``req`` (pure Python; no model call)."""
    if req.task not in TASKS:
        raise TaskError(f"unknown task {req.task!r} (choose from {', '.join(TASKS)})")
    if req.task in engine.disabled_tasks:
        raise TaskError(f"the {req.task} task is switched off ([features] in the config file)")
    if not isinstance(req.source, str):
        raise TaskError("source must be text")
    max_new = req.max_new_tokens or engine.default_max_new_tokens_for.get(req.task) or DEFAULT_MAX_NEW[req.task]
    budget, max_new = _budget(engine, max_new)
    if req.task == "complete":
        cap = req.context_tokens or engine.completion_context_tokens  # prefill time bounds latency
        return _plan_complete(engine, req, min(budget, cap) if cap else budget, max_new)
    if req.task == "explain":
        return _plan_explain(engine, req, budget, max_new)
    return _plan_function_task(engine, req, budget, max_new)


# ------------------------------------------------------------------------- running one request
LOOP_GUARD = 8  # comment / debug / explain (and the chat, which runs them): see model/repetition.py


def _guard(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {"loop_guard": plan.loop_guard} if plan.loop_guard else {}
    if plan.heal:
        out["heal"] = plan.heal
    if plan.beams > 1:
        out["beams"] = plan.beams
    if plan.rerank is not None:
        out["rerank"] = plan.rerank
    if plan.mix is not None:
        out["mix"] = plan.mix
    return out


def execute(engine: Engine, request: TaskRequest, cancel: CancelToken | None) -> Iterator[Event]:
    """Events of one request. Runs on the engine's worker thread (it calls the model)."""
    from assistant.engine import Event

    plan = make_plan(engine, request)
    tok = engine.tokenizer
    think_end = prompts.think_end_id(tok)
    splitter = prompts.MarkerSplitter(plan.answer_marker) if plan.answer_marker and plan.think else None
    params = engine.sampling_params(plan.max_new_tokens, request.max_seconds, stop_strings=plan.stop_strings,
                                    stop_token_ids=plan.stop_token_ids, **_guard(plan))
    in_answer = not plan.think
    reasoning: list[str] = []
    answer: list[str] = []
    answer_lps: list[float] = []
    finish_reason = "length"
    started = time.monotonic()
    limit = params.max_seconds
    stream = engine.backend.stream(plan.prompt_ids, params, cancel)
    renumber = _StreamRenumber(*plan.reasoning_lines) if plan.reasoning_lines else None
    for ev in stream:
        if ev.token_id == think_end and not in_answer:
            in_answer = True
            if renumber is not None and (rest := renumber.flush()):
                yield Event("reasoning", rest)
        elif ev.text and splitter is not None:
            for kind, text in splitter.push(ev.text):
                (answer if kind == "answer" else reasoning).append(text)
                if kind == "answer" and not in_answer:
                    in_answer = True
                    if renumber is not None and (rest := renumber.flush()):
                        yield Event("reasoning", rest)
                elif renumber is not None:
                    text = renumber.feed(text)
                if text:
                    yield Event(kind, text)
            in_answer = in_answer or splitter.in_answer
        elif ev.text:
            (answer if in_answer else reasoning).append(ev.text)
            if not in_answer and renumber is not None:
                if text := renumber.feed(ev.text):
                    yield Event("reasoning", text)
            else:
                yield Event("answer" if in_answer else "reasoning", ev.text)
        if in_answer and ev.token_id != think_end:
            answer_lps.append(ev.logprob)
        if cancel is not None and cancel.cancelled:
            finish_reason = "cancelled"
            break
        if limit is not None and time.monotonic() - started > limit + 1.0:
            finish_reason = "time"  # the generator's own guard should have stopped already
            break
    else:
        result = getattr(stream, "result", None)
        finish_reason = getattr(result, "finish_reason", "eos")
    for kind, text in splitter.flush() if splitter is not None else ():
        (answer if kind == "answer" else reasoning).append(text)
        yield Event(kind, text)
    if renumber is not None and (rest := renumber.flush()):
        yield Event("reasoning", rest)
    if splitter is not None and not splitter.in_answer:  # no marker: the whole text is the answer
        reasoning, answer = [], reasoning
    if finish_reason == "cancelled" or (cancel is not None and cancel.cancelled):
        yield Event("error", "cancelled")
        return
    gen = Generated("".join(reasoning), "".join(answer), answer_lps, finish_reason)
    yield Event("done", result=plan.finish(engine, gen))


def split_generation(tok: Any, token_ids: list[int], logprobs: list[float], think: bool,
                     answer_marker: str | None = None) -> Generated:
    """Split a finished generation's tokens at ``<|/think|>`` (batch road), or its text at
    ``answer_marker``."""
    think_end = prompts.think_end_id(tok)
    specials = {tok.eos_id, *getattr(tok, "stop_ids", ())}
    if think and answer_marker:
        keep = [(t, lp) for t, lp in zip(token_ids, logprobs) if t not in specials]
        r, a = prompts.split_text(tok.decode([t for t, _ in keep]), answer_marker)
        return Generated(r, a, [lp for _, lp in keep], "eos")
    ids = [t for t in token_ids]
    lps = list(logprobs) + [0.0] * (len(ids) - len(logprobs))
    if think and think_end in ids:
        k = ids.index(think_end)
        r_ids, a_ids, a_lps = ids[:k], ids[k + 1:], lps[k + 1:]
    elif think:
        r_ids, a_ids, a_lps = ids, [], []
    else:
        r_ids, a_ids, a_lps = [], ids, lps
    keep = [(t, lp) for t, lp in zip(a_ids, a_lps) if t not in specials]
    return Generated(tok.decode(r_ids), tok.decode([t for t, _ in keep]), [lp for _, lp in keep], "eos")


def iter_batch(engine: Engine, requests: Sequence[TaskRequest], batch_size: int = 4, cancel: Any = None,
               on_plan_error: Callable[[int, Exception], None] | None = None,
               window: int | None = None) -> Iterator[tuple[int, object]]:
    """``(index, result)`` for each request as its batch finishes (``result`` may be an
    exception for a request that failed). Generation is batched ``batch_size`` prompts at a
    time; model calls run on the engine's worker thread; Ctrl-C in the caller stops it.

    Requests are planned ``window`` at a time (default ``8 x batch_size``, at least 32): a
    plan holds its file's lines, so memory is bounded by the work in flight, not by how many
    functions a file has. A plan's ``pregate`` (debug with ``min_confidence``: one forward
    pass) may settle it before generation; the plans left wait across windows until they
    fill a batch (fewer than ``batch_size`` per kind of plan wait at any time)."""
    batch_size = max(1, batch_size)
    window = window or max(32, 8 * batch_size)
    waiting: dict[tuple, list[tuple[int, Plan]]] = {}
    for start in range(0, len(requests), window):
        yield from _plan_window(engine, requests, range(start, min(start + window, len(requests))), cancel, waiting)
        for key, members in waiting.items():
            if len(members) >= batch_size:
                members.sort(key=lambda m: len(m[1].prompt_ids))  # similar lengths batch with less padding
                full = len(members) - len(members) % batch_size
                chunk, members[:full] = members[:full], []
                yield from _generate(engine, key, chunk, batch_size, cancel)
    for key, members in waiting.items():
        members.sort(key=lambda m: len(m[1].prompt_ids))
        yield from _generate(engine, key, members, batch_size, cancel)


def _submit(engine: Engine, fn: Callable[[], Any], cancel: Any) -> Any:
    try:
        return engine.submit(fn)
    except KeyboardInterrupt:
        if cancel is not None:
            cancel.cancel()
        raise


def _error(e: BaseException) -> Exception:
    from assistant.engine import EngineError

    return EngineError(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _plan_window(engine: Engine, requests: Sequence[TaskRequest], indices: range, cancel: Any,
                 waiting: dict[tuple, list[tuple[int, Plan]]]) -> Iterator[tuple[int, object]]:
    """Plan ``indices``; yield what is settled without generation; the rest joins ``waiting``."""
    for i in indices:
        try:
            p = make_plan(engine, requests[i])
        except Exception as e:  # noqa: BLE001 - reported per request
            yield i, _error(e)
            continue
        if p.pregate is not None:
            try:
                settled = _submit(engine, lambda p=p: p.pregate(engine), cancel)  # type: ignore[misc]
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                yield i, _error(e)
                continue
            if settled is not None:
                yield i, settled
                continue
        key = (p.max_new_tokens, p.request.max_seconds, p.stop_strings, p.stop_token_ids, p.think, p.answer_marker,
               p.loop_guard, p.heal, p.beams, p.rerank is not None or p.mix is not None)
        waiting.setdefault(key, []).append((i, p))


def _generate(engine: Engine, key: tuple, members: list[tuple[int, Plan]], batch_size: int,
              cancel: Any) -> Iterator[tuple[int, object]]:
    """Generate for ``members`` (one kind of plan), ``batch_size`` at a time, and finish each."""
    if not members:
        return
    max_new, max_s, stops, stop_ids, think, marker, *_ = key
    tok = engine.tokenizer
    params = engine.sampling_params(max_new, max_s, stop_strings=stops, stop_token_ids=stop_ids,
                                    **_guard(members[0][1]))
    # each plan's own rerank / memory (it leaves out the plan's file): one request per call
    own = members[0][1].rerank is not None or members[0][1].mix is not None
    while members:
        n = 1 if own else batch_size
        chunk, members[:n] = members[:n], []  # done plans are dropped as we go
        prompts = [p.prompt_ids for _, p in chunk]
        if own:
            params = replace(params, rerank=chunk[0][1].rerank, mix=chunk[0][1].mix)
        try:
            outs = _submit(engine, lambda prompts=prompts, params=params: engine.backend.generate_batch(prompts, params, cancel),
                           cancel)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001
            for i, _ in chunk:
                yield i, _error(e)
            continue
        for (i, p), out in zip(chunk, outs):
            gen = split_generation(tok, out.token_ids, out.logprobs, think, marker)
            gen.finish_reason = out.finish_reason
            try:
                result = engine.submit(lambda p=p, gen=gen: p.finish(engine, gen))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001
                result = _error(e)
            yield i, result


def execute_batch(engine: Engine, requests: list[TaskRequest], batch_size: int = 4,
                  progress: Callable[[int], None] | None = None) -> list[object]:
    results: list[object] = [None] * len(requests)
    done = 0
    for i, r in iter_batch(engine, requests, batch_size):
        results[i] = r
        done += 1
        if progress is not None:
            progress(done)
    return results


# ------------------------------------------------------------------------- complete
def _plan_complete(engine: Engine, req: TaskRequest, budget: int, max_new: int) -> Plan:
    from assistant.context import build_context, source_window
    from model.formats import fim_suffix_stop

    tok = engine.tokenizer
    lines = req.source.split("\n")
    if not 0 <= req.line < len(lines):
        raise TaskError(f"line {req.line + 1} is outside the file (1..{len(lines)})")
    column = min(max(req.column, 0), len(lines[req.line]))
    source, line = source_window(req.source, req.line, budget)
    related, added = list(req.related), []
    mix = _repo_memory(engine, req) if req.repo and REPO_MEMORY else None
    if req.repo and (mix is None or REPO_STUBS_WITH_MEMORY):
        related, added = repo_related(req)  # on the whole document: its imports are at the top
    share = REPO_RELATED_SHARE if added else 0.15
    ctx = build_context(tok, source, line, column, budget=budget, related=related, related_share=share,
                        related_sep=not added)
    if added:
        ctx.report.trimmed.insert(0, f"repository context: added {', '.join(added[:8])}"
                                     f"{f' and {len(added) - 8} more' if len(added) > 8 else ''} "
                                     f"({ctx.report.related_tokens} tokens)")
    multiline = is_multiline(source, line, column)
    stop_ids = prompts.fim_stop_ids(tok)
    lines = source.split("\n")  # the window's: the post-filters look at the code near the cursor
    prefix = "\n".join(lines[:line] + [lines[line][:column]])
    suffix = "\n".join([lines[line][column:]] + lines[line + 1:])
    heal = healing_text(lines[line], column) if TOKEN_HEALING else ""
    if heal:  # the prompt stops at the word's (indentation's) start; the model spells it again
        cut = lines[:line] + [lines[line][:column - len(heal)] + lines[line][column:]] + lines[line + 1:]
        ctx = build_context(tok, "\n".join(cut), line, column - len(heal), budget=budget, related=related,
                            related_share=share, related_sep=not added)

    def finish(_engine: Engine, gen: Generated) -> Completion:
        answer = gen.answer
        if heal:
            answer = answer[len(heal):] if answer.startswith(heal) else "" if heal.startswith(answer) else answer
        text = postprocess_completion(answer, prefix, suffix, multiline)
        return Completion(text=text, multiline=multiline)

    at_suffix = fim_suffix_stop(suffix) if multiline else None  # the middle ends where the suffix begins
    stops = ("\n",) if not multiline else (at_suffix,) if at_suffix else ()
    beams = 1 if multiline else max(1, engine.completion_beams)
    rerank = _line_reranker(tok, lines, line, column, finish, stop_ids, mix if RERANK_WITH_MEMORY else None) \
        if beams > 1 and COMPLETION_RERANK else None
    if mix is not None:
        ctx.report.trimmed.insert(0, "repository context: the project's memory (kNN) mixed into each token")
        if MEMORY_OWN_FILE and isinstance(mix.exclude, str):  # the file's lines above the prompt take part
            first = max(0, min(req.line, req.line - line + ctx.report.dropped_prefix_lines))
            if first and _same_above(req, first):
                mix.exclude = (mix.exclude, first)
    return Plan(req, ctx.prompt_ids, max_new + (len(heal) + 1 if heal else 0), think=False, finish=finish,
                stop_strings=stops, stop_token_ids=stop_ids, notes=ctx.report.trimmed, heal=heal,
                beams=beams, rerank=rerank, mix=mix)


# With repository context, completion reads the project through its memory: a kNN-LM over every
# token position of the project's files (assistant/memory.py). False: the stubs only.
REPO_MEMORY = True
# The edited file's own entries above the prompt's first line take part too (the file's code that the
# prompt has no room for; their contexts end before the prompt, so nothing of the cursor's line or
# after it); False: the whole file is left out. Measured: docs/benchmarks.md, "The edited file's
# own memory".
MEMORY_OWN_FILE = True
# The stubs (signatures of imported names) as well as the memory: they cost the shipped model
# token accuracy with or without the memory (docs/benchmarks.md, "Repository memory"), so only a
# backend without a local model (no memory) gets them.
REPO_STUBS_WITH_MEMORY = False


def _same_above(req: TaskRequest, first: int) -> bool:
    """Whether the file on disk (what the memory read) has the request's lines above ``first``: an
    editor's unsaved edits there would move the lines, and the memory's entries near the cursor
    could then come from above the prompt's window."""
    try:
        disk = Path(req.path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError, TypeError):
        return False
    return disk[:first] == req.source.split("\n")[:first]


def _repo_memory(engine: Engine, req: TaskRequest):
    """SamplingParams.mix for a completion in ``req.repo`` (None: the backend has no local model)."""
    from assistant.memory import CompletionMemory, can_read

    model = getattr(engine.backend, "model", None)
    if not can_read(model, req.repo):
        return None
    return CompletionMemory(model, engine.tokenizer, req.repo, req.path, read_s=req.repo_read_s)


# Single-line completions searched with beams are picked by their own score plus this weight x the
# log-probability, read left to right, of the whole line and the next RERANK_SUFFIX_LINES lines
# after the last RERANK_CONTEXT_TOKENS tokens before it: the model checks each candidate against
# the code that follows it, in the mode it is strongest in (plain left-to-right code). 0 = off.
# Measured on 307 single-line held-out items (docs/benchmarks.md, "Beams reranked by the code after
# the line"): exact match 13.7% -> 17.3% at 5 beams.
COMPLETION_RERANK = 0.1
RERANK_SUFFIX_LINES = 3
RERANK_CONTEXT_TOKENS = 128  # 384: the same exact match on seed 1 (17.3%), at 3x the prefill
# With repository context the rerank reads the candidates with the memory mixed in too (as the beams
# were written); False: the model alone, which outvoted the memory's names from other files.
RERANK_WITH_MEMORY = True


def _line_reranker(tok, lines: list[str], line: int, column: int, finish, stop_ids, mix=None) -> Callable | None:
    """SamplingParams.rerank for a single-line completion at (``line``, ``column``) of ``lines``; ``mix``:
    the completion's memory, which reads the candidates as it wrote them."""
    from model.generate import continuation_logprobs

    context = tok.encode("\n".join(lines[:line]) + "\n")[-RERANK_CONTEXT_TOKENS:] if line else []
    if not context:
        return None  # the file's first line: nothing to read the candidates after
    head, tail = lines[line][:column], lines[line][column:]
    after = "\n".join(lines[line + 1:line + 1 + RERANK_SUFFIX_LINES])
    stops = set(stop_ids) | {int(tok.eos_id)}

    def rerank(model, answers: list[list[int]]) -> list[float]:
        conts = []
        for ids in answers:
            text = tok.decode_bytes([t for t in ids if t not in stops]).decode("utf-8", errors="replace")
            done = finish(None, Generated("", text.split("\n")[0], [], "stop"))
            conts.append(tok.encode(head + done.text + tail + "\n" + after) or [int(tok.eos_id)])
        room = model.cfg.max_seq_len - len(context)  # long lines: the code after is cut, never an error
        lps = continuation_logprobs(model, context, [c[:room] for c in conts], mix=mix)
        return [COMPLETION_RERANK * lp for lp in lps]

    return rerank


TOKEN_HEALING = True  # mid-word completion continues the word (lsp.bench --mode midword measures it)
# and a completion after the indentation starts from the line's start (the eval's fim suite measures it)
_WORD_END = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
HEAL_MAX_CHARS = 24


def healing_word(line: str, column: int) -> str:
    """The identifier the cursor is at the end of ("sp" in ``text.sp|``), or "" (the cursor is
    not at the end of a word, or inside one: ``wo|rd``)."""
    after = line[column:column + 1]
    if after and (after.isalnum() or after == "_"):
        return ""
    m = _WORD_END.search(line[:column])
    return m.group(0) if m and len(m.group(0)) <= HEAL_MAX_CHARS else ""


HEAL_MAX_INDENT = 64


def healing_text(line: str, column: int) -> str:
    """What the completion prompt leaves for the model to spell again: the word at the cursor
    (``healing_word``), or the indentation when only whitespace precedes the cursor on its line.
    An editor puts the cursor after the indentation, but the model was trained on middles that
    begin at a line start: a prompt ending in spaces asks it for a token split it has rarely seen
    (``12 spaces`` then ``segments`` instead of ``11 spaces`` then `` segments``)."""
    before = line[:column]
    if before and not before.strip() and len(before) <= HEAL_MAX_INDENT:
        return before
    return healing_word(line, column)


REPO_RELATED_SHARE = 0.35  # of the completion prompt, for repository context (stubs are dense)


def repo_related(req: TaskRequest) -> tuple[list[tuple[str, str]], list[str]]:
    """(related pieces: repository definitions first, then the request's own related files;
    names added). Never raises: a repository that cannot be read adds nothing."""
    from assistant.repo import index_for

    try:
        idx = index_for(req.repo)
        source = req.source
        on_disk = idx.rel(req.path) and idx._read(idx.rel(req.path) or "")
        if on_disk and on_disk != source:  # a face may send a window of the file: its imports from disk
            source = "\n".join(codemod.lines(on_disk)[i] for i in codemod.import_lines(on_disk)) + "\n" + source
            line = req.line + source.count("\n") - req.source.count("\n")
        else:
            line = req.line
        pieces, added = idx.context_for(req.path, source, line, recent=req.recent)
    except (OSError, ValueError, RecursionError):
        return list(req.related), []
    have = {p for p, _ in req.related}
    return [*[(p, t) for p, t in pieces if p not in have], *req.related], added


_OPEN = {"(": ")", "[": "]", "{": "}"}
_CLOSE = {v: k for k, v in _OPEN.items()}


def is_multiline(source: str, line: int, column: int) -> bool:
    """Whether a completion at the cursor should span lines, from the syntax there.

    Single line inside strings and comments, when code follows the cursor on its line, and
    mid-statement; multi-line right after a block header (``...:``), on the first line of an
    empty body and on a blank line that ends its block (the next code is less indented, or there
    is none). A blank line with code below it as indented as the cursor (between two statements,
    or above a body that is there already), or inside open brackets, fills a gap: one line
    (measured: docs/benchmarks.md, "One line above a body that is there").
    """
    lines = source.split("\n")
    cur = lines[line] if 0 <= line < len(lines) else ""
    before, after = cur[:column], cur[column:]
    if after.strip() and not all(c in ")]}:;, \t" for c in after):
        return False
    tree = codemod.parse(source)
    byte_col = len(before.encode("utf-8"))
    node = tree.root_node.descendant_for_point_range((line, byte_col), (line, byte_col))
    n = node
    while n is not None:
        if n.type in ("string", "comment", "string_content"):
            if not (n.end_point == (line, byte_col) and n.type != "string_content"):
                return False
        n = n.parent
    if before.strip():
        return before.rstrip().endswith(":") and not _open_brackets(before)
    prev = next((ln for ln in reversed(lines[:line]) if ln.strip()), "")
    nxt = next((ln for ln in lines[line + 1:] if ln.strip()), None)
    gap = nxt is not None and _indent_of(nxt) >= len(before)  # code goes on at the cursor's depth: fill a gap
    if prev.rstrip().endswith(":") and not prev.lstrip().startswith("#"):
        return not gap  # the first line of a new body (one line when the body is there already)
    if _open_brackets("\n".join(lines[max(0, line - 50):line])):
        return False
    return not gap


def _scan_brackets(text: str, stack: list[str] | None = None) -> tuple[list[str], int | None]:
    """Bracket stack after ``text`` (strings and comments skipped) and the index of the
    first unmatched closer (None if none)."""
    stack = list(stack or [])
    i, n = 0, len(text)
    quote: str | None = None
    while i < n:
        c = text[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if text.startswith(quote, i):
                i += len(quote)
                quote = None
                continue
            if c == "\n" and len(quote) == 1:
                quote = None
            i += 1
            continue
        if c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c in "\"'":
            quote = text[i:i + 3] if text.startswith(c * 3, i) else c
            i += len(quote)
            continue
        if c in _OPEN:
            stack.append(c)
        elif c in _CLOSE:
            if stack and stack[-1] == _CLOSE[c]:
                stack.pop()
            else:
                return stack, i
        i += 1
    return stack, None


# lines that start a statement: a def, a class, a decorator (never inside brackets; inside a string only in an
# odd docstring)
_STATEMENT_START = re.compile(r"^[ \t]*(?:(?:async[ \t]+)?def|class)[ \t]|^[ \t]*@[A-Za-z_]", re.M)


def _open_brackets(text: str) -> list[str]:
    """The brackets still open at the end of ``text``: scanned from its last def/class/decorator line (or its start),
    and afresh after a closer that nothing opened (the text began inside brackets: a window of a file)."""
    starts = [m.start() for m in _STATEMENT_START.finditer(text)]
    if starts:
        text = text[starts[-1]:]
    stack: list[str] = []
    while True:
        stack, bad = _scan_brackets(text, stack)
        if bad is None:
            return stack
        text, stack = text[bad + 1:], []


def postprocess_completion(text: str, prefix: str, suffix: str, multiline: bool) -> str:
    """The post-filters of a raw FIM middle (see the module docstring)."""
    text = text.rstrip("\ufffd")  # cut at the token limit inside a UTF-8 character: drop the half
    if not text:
        return ""
    if not multiline:
        text = text.split("\n", 1)[0]
    # 1. stop where the completion starts repeating the suffix
    after_cursor = suffix.split("\n", 1)[0]
    next_lines = [s.strip() for s in suffix.split("\n")[1:] if s.strip()][:1]
    out_lines = text.split("\n")
    for k, ln in enumerate(out_lines):
        if k and next_lines and ln.strip() == next_lines[0] and len(next_lines[0]) >= 3:
            out_lines = out_lines[:k]
            break
    text = "\n".join(out_lines)
    if after_cursor.strip() and text.rstrip().endswith(after_cursor.strip()):
        text = text.rstrip()[: len(text.rstrip()) - len(after_cursor.strip())]
    # 2. repetition guard: a block of 1-4 lines repeated three times in a row, or a short
    #    pattern looping at the end of a line
    text = _cut_repetition(text)
    # 3. balanced brackets: never close what the completion did not open when the suffix
    #    already closes the cursor line's brackets
    # (the statement's brackets, not the line's: a continuation line may close a signature's "(")
    stmt_open = _open_brackets(prefix[-20000:])
    suffix_closes = len(after_cursor) - len(after_cursor.lstrip(")]} \t"))
    start_stack = [] if after_cursor.lstrip().startswith((")", "]", "}")) or suffix_closes else stmt_open
    stack, bad = _scan_brackets(text, start_stack)
    if bad is not None:
        text = text[:bad]
        stack, _ = _scan_brackets(text, start_stack)
    if multiline and len(stack) > len(start_stack):
        # the completion left brackets of its own open: drop trailing lines until balanced
        parts = text.split("\n")
        while len(parts) > 1:
            parts.pop()
            st, _ = _scan_brackets("\n".join(parts), start_stack)
            if len(st) <= len(start_stack):
                break
        text = "\n".join(parts)
    # 4. stay inside the indentation block
    if multiline:
        text = _stay_in_block(text, prefix)
    return text.rstrip() if multiline else text.rstrip("\n")


def _cut_repetition(text: str) -> str:
    lines = text.split("\n")
    for i in range(len(lines)):
        for k in range(1, 5):
            block = lines[i:i + k]
            if len(block) < k or not any(s.strip() for s in block):
                continue
            if lines[i + k:i + 2 * k] == block and lines[i + 2 * k:i + 3 * k] == block:
                return "\n".join(lines[:i + k])
    m = re.search(r"(.{1,12}?)\1{5,}$", lines[-1]) if lines else None
    if m and len(m.group(0)) >= 12:
        lines[-1] = lines[-1][: m.start() + len(m.group(1))]
        return "\n".join(lines)
    return text


def _indent_of(s: str) -> int:
    return len(s) - len(s.lstrip(" \t"))


def _stay_in_block(text: str, prefix: str) -> str:
    cur = prefix.rsplit("\n", 1)[-1]
    if cur.strip():
        base = _indent_of(cur)
        if cur.rstrip().endswith(":"):
            base += 1  # the body of the header: deeper than the header itself
    else:
        base = len(cur)
        prev = next((s for s in reversed(prefix.split("\n")[:-1]) if s.strip()), "")
        if not cur and prev:
            base = _indent_of(prev) + (1 if prev.rstrip().endswith(":") else 0)
    lines = text.split("\n")
    for k in range(1, len(lines)):
        if lines[k].strip() and _indent_of(lines[k]) < base:
            return "\n".join(lines[:k])
    return text


# ------------------------------------------------------------------------- function tasks
def _target_function(req: TaskRequest) -> codemod.Scope | None:
    if req.function:
        funcs = codemod.functions(req.source)
        named = [f for f in funcs if f.qualname == req.function] or [f for f in funcs if f.name == req.function]
        if not named:
            raise TaskError(f"no function named {req.function!r}" + (f" in {req.path}" if req.path else ""))
        # the same name defined twice (if/else, overloads): the one at the request's line
        return next((f for f in named if f.decorated_start <= req.line <= f.end_line), named[0])
    return codemod.function_at(req.source, req.line)


def _fit_code(tok: Any, task: str, code_lines: list[str], budget: int, numbered: bool,
              notes: list[str]) -> tuple[list[int], int]:
    """Task prompt ids for as many leading lines of the code as fit; (ids, lines kept)."""
    from model.formats import number_lines

    def prompt(k: int) -> list[int]:
        code = "\n".join(code_lines[:k])
        return prompts.task_prompt(tok, task, number_lines(code) if numbered else code)

    n = len(code_lines)
    ids = prompt(n)
    if len(ids) <= budget:
        return ids, n
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(prompt(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    ids = prompt(lo)
    if len(ids) > budget:
        raise TaskError(f"the code does not fit the model's context ({len(ids)} > {budget} tokens)")
    notes.append(f"kept the first {lo} of {n} lines of the code")
    return ids, lo


def _plan_function_task(engine: Engine, req: TaskRequest, budget: int, max_new: int) -> Plan:
    tok = engine.tokenizer
    src_lines = req.source.split("\n")
    func = _target_function(req)
    notes: list[str] = []
    if func is None:
        if req.task == "comment":
            raise TaskError(f"no function at line {req.line + 1}")
        # debug of a snippet that is not a function: the whole text (or the selection)
        first = min(max(req.line, 0), len(src_lines) - 1) if req.end_line is not None else 0
        last = min(req.end_line, len(src_lines) - 1) if req.end_line is not None else len(src_lines) - 1
        name = "<module>"
        code_lines = src_lines[first:last + 1]
        dedent_by = 0
    else:
        first, last, name = func.decorated_start, func.end_line, func.qualname
        code_lines = src_lines[first:last + 1]
        dedent_by = min((_indent_of(s) for s in code_lines if s.strip()), default=0)
        code_lines = [s[dedent_by:] if s[:dedent_by].strip() == "" else s.lstrip() for s in code_lines]
    if req.task == "comment":
        assert func is not None
        kept_idx = list(range(len(code_lines)))
        if func.docstring_lines is not None:
            a, b = func.docstring_lines
            kept_idx = [i for i in kept_idx if not a - first <= i <= b - first]
        prompt_lines = [code_lines[i] for i in kept_idx]
        ids, _ = _fit_code(tok, "comment", prompt_lines, budget, False, notes)
        style = codemod.docstring_style(req.source)

        def finish_comment(_engine: Engine, gen: Generated) -> Docstring:
            return make_docstring(func, gen.answer, gen.reasoning, style)

        return Plan(req, ids, max_new, think=True, finish=finish_comment, notes=notes,
                    answer_marker=prompts.answer_marker(tok), loop_guard=LOOP_GUARD)

    ids, kept = _fit_code(tok, "debug", code_lines, budget, True, notes)
    surprisal_lines = code_lines[:kept]

    # the calibrated gate reads our model's first reasoning token; open checkpoints use the
    # answer probability x surprisal rank
    use_gate = None if prompts.kind(tok) == "moecoder" else False
    gate: list[float | None] = []  # the gate score once the pre-gate computed it (one forward, not two)

    def finish_debug(eng: Any, gen: Generated) -> DebugResult:
        return make_debug_result(eng, req, name, first, surprisal_lines, src_lines, gen, prompt_ids=ids,
                                 gate_score=gate[0] if gate else None, use_gate=use_gate)

    def pregate(eng: Any) -> DebugResult | None:
        """No hint when the gate alone keeps any hint below ``req.min_confidence``."""
        if req.min_confidence is None or not DEBUG_USE_GATE or use_gate is False:
            return None
        gate.append(debug_gate_score(eng, ids))
        if gate[0] is not None and debug_confidence_bound(gate[0]) < req.min_confidence:
            return DebugResult(hints=[], reasoning="")
        return None

    return Plan(req, ids, max_new, think=True, finish=finish_debug, notes=notes,
                reasoning_lines=(first, len(surprisal_lines)), answer_marker=prompts.answer_marker(tok),
                loop_guard=LOOP_GUARD, pregate=pregate)


def question_lines(question: str | None, limit: int = 400) -> list[str]:
    """The user's question as comment lines above the code (the model was trained on code;
    a comment is how words reach it), cut to ``limit`` characters."""
    if not question or not question.strip():
        return []
    text = " ".join(question.split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return [f"# Question: {text}"]


def _plan_explain(engine: Engine, req: TaskRequest, budget: int, max_new: int) -> Plan:
    tok = engine.tokenizer
    src_lines = req.source.split("\n")
    if req.end_line is not None:
        a = min(max(req.line, 0), len(src_lines) - 1)
        b = min(max(req.end_line, a), len(src_lines) - 1)
    elif req.function or codemod.function_at(req.source, req.line):
        f = _target_function(req)
        assert f is not None
        a, b = f.decorated_start, f.end_line
    else:
        a = b = min(max(req.line, 0), len(src_lines) - 1)
    code = textwrap.dedent("\n".join(src_lines[a:b + 1]))
    notes: list[str] = []
    ids, _ = _fit_code(tok, "explain", question_lines(req.question) + code.split("\n"), budget, False, notes)

    def finish(_engine: Engine, gen: Generated) -> Explanation:
        return Explanation(text=gen.answer.strip(), reasoning=gen.reasoning.strip())

    return Plan(req, ids, max_new, think=True, finish=finish, notes=notes, answer_marker=prompts.answer_marker(tok),
                loop_guard=LOOP_GUARD)


# ------------------------------------------------------------------------- debug results
def line_surprisal(engine: Engine, code_lines: list[str]) -> list[float]:
    """Mean surprisal (-log p, nats/token) of each line under the model; 0.0 for blank lines."""
    tok = engine.tokenizer
    ids: list[int] = [tok.eos_id]
    spans: list[tuple[int, int]] = []
    limit = engine.context_length
    for ln in code_lines:
        piece = tok.encode(ln + "\n")
        if len(ids) + len(piece) > limit:
            spans.append((len(ids), len(ids)))
            continue
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    lps = engine.backend.token_logprobs(ids) if len(ids) > 1 else [0.0] * len(ids)
    out = []
    for (a, b), ln in zip(spans, code_lines):
        if b <= a or not ln.strip():
            out.append(0.0)
        else:
            out.append(-sum(lps[a:b]) / (b - a))
    return out


def calibrate(answer_logprobs: list[float], rank: float) -> float:
    """Confidence of a finding from the model's mean answer log-probability and the
    flagged line's surprisal rank among the function's lines (1.0 = most surprising)."""
    p = math.exp(sum(answer_logprobs) / len(answer_logprobs)) if answer_logprobs else 0.3
    c = p * (0.4 + 0.6 * rank)
    return round(min(0.99, max(0.01, c)), 3)


def parse_debug_answer(text: str) -> tuple[bool, int | None, str, str | None]:
    """(parsed, line, hint, fix) from a debug answer. ``(True, None, "", None)`` is "no issue";
    ``parsed`` False means the answer was neither (garbage). The parsing is
    :func:`model.formats.parse_finding` (loose), the one debug-answer parser."""
    from model.formats import parse_finding

    try:
        f = parse_finding(text, loose=True)
    except ValueError:
        return False, None, "", None
    if f is None:
        return True, None, "", None
    return True, f.line, f.hint, f.fix


_CODE_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d*)?|==|!=|<=|>=|//|\*\*|->|[-+*/%<>=!&|^~@]=?|\S")


def _code_tokens(text: str) -> list[str]:
    return _CODE_TOKEN.findall(text)


def _mentions(line: str, snippet: str) -> bool:
    """Whether ``snippet`` occurs in ``line`` as whole code tokens (``<`` is not in ``<=``)."""
    want, have = _code_tokens(snippet), _code_tokens(line)
    if not want:
        return True
    k = len(want)
    return any(have[i:i + k] == want for i in range(len(have) - k + 1))


# The debug decision. In training (``model.data.tasks``) the reasoning of a buggy function
# starts "Line N ..." and that of a clean one "Takes ...", so the model decides at its first
# reasoning token. The gate score is log P(first token of "Line") - log P(first token of
# "Takes") after the prompt, one forward pass. Generated answers over-flag real code (~90%
# of clean functions get "line N: ..."), so the score, not the sampled answer, sets the
# confidence: sigmoid((score - DEBUG_GATE_THRESHOLD) / DEBUG_GATE_SCALE) x the consistency
# factor, i.e. 0.5 (the review's default --min-confidence) at the threshold. The threshold
# was chosen by ``scripts/calibrate_debug.py`` on held-out code (textual and this repo's
# assistant/: <= 8% flagged clean functions in each) and tested on other packages and this
# repo's lsp/tui/kernels (docs/benchmarks.md, "Debug calibration"). Adding the flagged
# line's surprisal rank or the answer's probability did not help on the calibration set.
DEBUG_BUG_START = "Line"
DEBUG_CLEAN_START = "Takes"
DEBUG_GATE_THRESHOLD = 1.05
DEBUG_GATE_SCALE = 1.0
DEBUG_USE_GATE = True  # False: the older answer-probability x surprisal-rank confidence
DEBUG_GATE_FACTORS = True  # multiply the gate confidence by the consistency checks' factor
DEBUG_RANK_WEIGHT = 0.0  # weight of the flagged line's surprisal rank in the gate's logit


def debug_gate_score(engine: Engine, prompt_ids: Sequence[int]) -> float | None:
    """log P("Line"...) - log P("Takes"...) for the first reasoning token after a debug
    prompt (ending in ``<|think|>``); positive = the model leans to "there is a bug".
    None when the backend cannot score (then the older confidence is used)."""
    tok = engine.tokenizer
    try:
        bug_id = tok.encode(DEBUG_BUG_START)[0]
        clean_id = tok.encode(DEBUG_CLEAN_START)[0]
    except (IndexError, AttributeError, TypeError):
        return None
    ids = list(prompt_ids)
    if not ids:
        return None
    try:
        a, b = engine.backend.next_token_logprobs(ids, [bug_id, clean_id])
        return float(a - b)
    except Exception:  # noqa: BLE001 - a fake or broken backend: fall back
        return None


def gate_confidence(score: float, threshold: float | None = None, scale: float | None = None,
                    rank: float | None = None) -> float:
    """Confidence in [0.01, 0.99] from a gate score; 0.5 at the threshold. ``rank`` (the
    flagged line's surprisal percentile, 0..1) adds ``DEBUG_RANK_WEIGHT x (rank - 1/2)``."""
    t = DEBUG_GATE_THRESHOLD if threshold is None else threshold
    k = DEBUG_GATE_SCALE if scale is None else scale
    z = (score - t) / k
    if rank is not None:
        z += DEBUG_RANK_WEIGHT * (rank - 0.5)
    z = max(-50.0, min(50.0, z))
    return round(min(0.99, max(0.01, 1.0 / (1.0 + math.exp(-z)))), 3)


def debug_confidence_bound(score: float) -> float:
    """The highest confidence :func:`make_debug_result` can give a hint with gate ``score``:
    the consistency factors are at most 1, and the rank term (when weighted) at its best. A
    hint below the review's threshold here needs no generation (the review's pre-gate)."""
    rank = None if not DEBUG_RANK_WEIGHT else (1.0 if DEBUG_RANK_WEIGHT > 0 else 0.0)
    return gate_confidence(score, rank=rank)


FIX_MIN_SIMILARITY = 0.6  # a fix is a small edit of its line (one token, in training)
FIX_SAME_FACTOR = 0.5  # a "fix" that repeats the line: the model did not know the fix
REANCHOR_FACTOR = 0.7  # the hint's quote is on a nearby line: the model misnumbered


@dataclass
class CheckedAnswer:
    """A debug answer after the consistency checks: 1-based ``n`` in the code shown to the
    model, the hint, the full replacement line (or None) and the confidence ``factor``."""

    n: int
    hint: str
    fix: str | None
    factor: float


def check_debug_answer(answer: str, first: int, code_lines: list[str], src_lines: list[str]) -> CheckedAnswer | None:
    """Parse a debug answer and check it against the code; None for "no issue" or garbage.

    Consistency checks catch a small model's slips: the first code it quotes in the hint
    (```x``` ...) must be on the flagged line — if it is on a line nearby (within 3), the
    hint moves there (factor x0.7), otherwise factor x0.5; a fix that is not a small edit of
    the line (similarity < 0.6) is dropped (x0.8), and a "fix" equal to the line is dropped
    (x0.5).
    """
    import difflib

    ok, n, hint, fix = parse_debug_answer(answer)
    if not ok or n is None or not 1 <= n <= len(code_lines) or not hint:
        return None
    factor = 1.0
    quoted = re.findall(r"`([^`]+)`", hint)
    if quoted and not _mentions(code_lines[n - 1], quoted[0]):
        near = [k for k in range(max(1, n - 3), min(len(code_lines), n + 3) + 1)
                if _mentions(code_lines[k - 1], quoted[0])]
        if near:  # the model misnumbered: trust the quote, but less
            n = min(near, key=lambda k: (abs(k - n), k))
            factor *= REANCHOR_FACTOR
        else:
            factor *= 0.5
    line = first + n - 1
    original = src_lines[line] if 0 <= line < len(src_lines) else ""
    full_fix = None
    if fix is not None and fix.strip():
        if fix.strip() == original.strip():
            factor *= FIX_SAME_FACTOR
        elif difflib.SequenceMatcher(None, original.strip(), fix.strip()).ratio() < FIX_MIN_SIMILARITY:
            factor *= 0.8
        else:
            full_fix = original[: _indent_of(original)] + fix.strip()
    return CheckedAnswer(n, hint, full_fix, factor)


def legacy_confidence(engine: Engine, code_lines: list[str], n: int, answer_logprobs: list[float]) -> float:
    """The older confidence: the answer's mean probability x the flagged line's surprisal rank."""
    return calibrate(answer_logprobs, surprisal_rank(engine, code_lines, n))


def surprisal_rank(engine: Engine, code_lines: list[str], n: int) -> float:
    """Percentile of line ``n``'s (1-based) surprisal among the non-blank lines (1.0 = most surprising)."""
    surprisal = line_surprisal(engine, code_lines)
    nonblank = [s for s, ln in zip(surprisal, code_lines) if ln.strip()]
    mine = surprisal[n - 1]
    rank = 0.5
    if len(nonblank) > 1:  # mid-rank percentile: ties share the middle of their range
        below = sum(1 for s in nonblank if s < mine)
        equal = sum(1 for s in nonblank if s == mine)
        rank = (below + (equal - 1) / 2) / (len(nonblank) - 1)
    return rank


_LINE_REF = re.compile(r"\b([Ll]ines?) (\d+)(?:(-|–| to | and )(\d+))?\b")


def file_line_numbers(text: str, first: int, n_lines: int) -> str:
    """The model counts lines from the start of the code it was shown ("Line 6"); the user
    reads the file's numbers (``small.py:21``). Rewrites "line N" (and "lines N-M") to file
    numbers, ``first`` being the 0-based file line of the code's line 1."""

    def sub(m: re.Match[str]) -> str:
        a = int(m.group(2))
        b = int(m.group(4)) if m.group(4) else None
        if not 1 <= a <= n_lines or (b is not None and not 1 <= b <= n_lines):
            return m.group(0)
        out = f"{m.group(1)} {first + a}"
        return out + (f"{m.group(3)}{first + b}" if b is not None else "")

    return _LINE_REF.sub(sub, text) if first else text


class _StreamRenumber:
    """:func:`file_line_numbers` on streamed text: holds back the last few characters so that
    a "line 12" split across deltas is rewritten whole."""

    HOLD = 24  # longer than any "lines 123 and 456"

    def __init__(self, first: int, n_lines: int):
        self.first, self.n, self.buf = first, n_lines, ""

    def feed(self, text: str) -> str:
        self.buf += text
        cut = self.buf.rfind(" ", 0, max(0, len(self.buf) - self.HOLD) + 1)
        if cut <= 0:
            return ""
        for m in _LINE_REF.finditer(self.buf):
            if m.start() < cut < m.end():
                cut = m.start()
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return file_line_numbers(out, self.first, self.n)

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return file_line_numbers(out, self.first, self.n)


def make_debug_result(engine: Engine, req: TaskRequest, name: str, first: int, code_lines: list[str],
                      src_lines: list[str], gen: Generated, prompt_ids: Sequence[int] | None = None,
                      gate_score: float | None = None, use_gate: bool | None = None) -> DebugResult:
    """The hint from a debug answer, checked against the code (:func:`check_debug_answer`)
    and calibrated.

    With ``prompt_ids`` (or a precomputed ``gate_score``) the confidence is the calibrated
    gate, :func:`gate_confidence` of :func:`debug_gate_score` (times the consistency factor
    when ``DEBUG_GATE_FACTORS``); without, the older answer-probability x surprisal-rank
    confidence times the consistency factor.
    """
    reasoning = file_line_numbers(gen.reasoning.strip(), first, len(code_lines))
    checked = check_debug_answer(gen.answer, first, code_lines, src_lines)
    if checked is None:
        return DebugResult(hints=[], reasoning=reasoning)
    gate = DEBUG_USE_GATE if use_gate is None else use_gate
    if gate and gate_score is None and prompt_ids is not None:
        gate_score = debug_gate_score(engine, prompt_ids)
    if gate and gate_score is not None:
        rank = surprisal_rank(engine, code_lines, checked.n) if DEBUG_RANK_WEIGHT else None
        conf = gate_confidence(gate_score, rank=rank) * (checked.factor if DEBUG_GATE_FACTORS else 1.0)
    else:
        conf = legacy_confidence(engine, code_lines, checked.n, gen.answer_logprobs) * checked.factor
    conf = round(max(0.01, conf), 3)
    line = first + checked.n - 1
    hint = file_line_numbers(checked.hint, first, len(code_lines))
    return DebugResult(hints=[Hint(req.path, name, line, hint, checked.fix, conf, reasoning)],
                       reasoning=reasoning)


# ------------------------------------------------------------------------- docstrings
def parse_docstring_text(text: str) -> DocParts:
    """Summary and sections of a docstring in any of the styles (:func:`model.docstrings.parse`)."""
    return docstrings.parse(text)


def render_docstring(parts: DocParts, style: str, func: codemod.Scope | None, indent: str) -> str:
    """The full docstring literal in ``style`` (:func:`model.docstrings.render`) with the
    function's real signature."""
    if func is None:
        return docstrings.render(parts, style, indent)
    return docstrings.render(parts, style, indent, name=func.name, params=list(func.params),
                             types=func.param_types, raises=list(func.raises), returns_value=func.returns_value)


def make_docstring(func: codemod.Scope, answer: str, reasoning: str, style: str) -> Docstring:
    parts = parse_docstring_text(answer)
    text = render_docstring(parts, style, func, func.body_indent)
    insert = func.body_start_line if func.body_start_line > func.start_line else func.start_line + 1
    rs = re_ = None
    if func.docstring_lines is not None:
        rs, re_ = func.docstring_lines
        insert = rs
    return Docstring(function=func.qualname, text=text, insert_line=insert, indent=func.body_indent, style=style,
                     reasoning=reasoning.strip(), replace_start=rs, replace_end=re_)


# ------------------------------------------------------------------------- CLI
_USAGE = {
    "complete": "moecoder complete FILE:LINE:COL   (1-based line and column)",
    "comment": "moecoder comment FILE FUNC",
    "debug": "moecoder debug FILE [FUNC] [--run] [--tests PATH[::NODE] ...]",
    "explain": "moecoder explain FILE:START-END   (1-based, inclusive)",
}


def _parser(task: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"moecoder {task}", usage=_USAGE[task],
                                description=f"Run the {task} task with the model, streaming reasoning then answer.")
    if task == "comment":
        p.add_argument("target", metavar="FILE")
        p.add_argument("function", metavar="FUNC")
    elif task == "debug":
        p.add_argument("target", metavar="FILE")
        p.add_argument("function", metavar="FUNC", nargs="?")
        p.add_argument("--min-confidence", type=float, default=None, metavar="X",
                       help="hide hints below this confidence, 0..1 (default: the review's, 0.5 or "
                            "review.min_confidence in the config file)")
        p.add_argument("--run", action="store_true",
                       help="run the evidence (doctest examples, the repository's tests that call the function) "
                            "in a sandbox: localise with it and verify fixes (this executes the code)")
        p.add_argument("--tests", metavar="PATH[::NODE]", action="append", default=[],
                       help="tests to run as evidence (implies --run; repeatable)")
        p.add_argument("--no-repo-tests", action="store_true", help="with --run: only doctests and --tests")
        p.add_argument("--budget", type=float, default=90.0, metavar="S",
                       help="with --run: seconds per function for running and repairing (default 90)")
    else:
        p.add_argument("target", metavar="FILE:LINE:COL" if task == "complete" else "FILE:START-END")
    if task == "complete":
        p.add_argument("--repo", metavar="DIR", default=None,
                       help="repository context: the project's memory, a kNN-LM over its files (the first use "
                            "reads the project through the model, minutes for a large one; kept in "
                            "~/.cache/moecoder, later uses read only the files that changed)")
    p.add_argument("--model", metavar="DIR", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--max-tokens", type=int, default=None, help="most new tokens per request")
    p.add_argument("--max-seconds", type=float, default=None, help="time limit per request")
    p.add_argument("--no-reasoning", action="store_true", help="do not show the model's reasoning")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


class UsageError(ValueError):
    pass


def _read_source(path: str) -> str:
    from assistant.files import Unreadable, read_text

    try:
        return read_text(path)
    except Unreadable as e:
        raise UsageError(f"{path}: {e}") from None


def _requests(task: str, args: argparse.Namespace) -> list[TaskRequest]:
    common = {"max_new_tokens": args.max_tokens, "max_seconds": args.max_seconds}
    if task == "complete":
        m = re.fullmatch(r"(.+):(\d+):(\d+)", args.target)
        if not m:
            raise UsageError(f"expected FILE:LINE:COL, got {args.target!r}")
        src = _read_source(m.group(1))
        line, col = int(m.group(2)) - 1, int(m.group(3)) - 1
        lines = src.split("\n")
        if not 0 <= line < len(lines):
            raise UsageError(f"{args.target}: line {line + 1} is outside the file (lines 1..{len(lines)})")
        if not 0 <= col <= len(lines[line]):
            raise UsageError(f"{args.target}: column {col + 1} is outside line {line + 1} "
                             f"(columns 1..{len(lines[line]) + 1})")
        if args.repo is not None and not os.path.isdir(args.repo):
            raise UsageError(f"--repo {args.repo}: not a directory")
        return [TaskRequest("complete", src, m.group(1), line, col, repo=args.repo, recent=[] if args.repo else None,
                            **common)]
    if task == "explain":
        m = re.fullmatch(r"(.+):(\d+)(?:-(\d+))?", args.target)
        if not m:
            raise UsageError(f"expected FILE:START-END, got {args.target!r}")
        src = _read_source(m.group(1))
        a = int(m.group(2)) - 1
        b = int(m.group(3) or m.group(2)) - 1
        n = len(src.split("\n"))
        if a > b:
            raise UsageError(f"{args.target}: the range is reversed (start {a + 1} > end {b + 1}); "
                             f"write {b + 1}-{a + 1}")
        if not (0 <= a and b < n):
            raise UsageError(f"{args.target}: lines outside the file (1..{n})")
        return [TaskRequest("explain", src, m.group(1), a, end_line=b, **common)]
    src = _read_source(args.target)
    try:  # as the review: a file that does not parse has no functions to comment or debug
        import ast

        ast.parse(src, filename=args.target)
    except SyntaxError as e:
        raise UsageError(f"{args.target}: does not parse: {e.msg} (line {e.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise UsageError(f"{args.target}: does not parse: {type(e).__name__}") from None
    if args.function:
        if codemod.find_function(src, args.function) is None:
            raise UsageError(f"{args.target}: no function named {args.function!r}")
        return [TaskRequest(task, src, args.target, function=args.function, **common)]
    funcs = codemod.functions(src)
    if not funcs:
        raise UsageError(f"{args.target}: no functions found")
    return [TaskRequest(task, src, args.target, function=f.qualname, line=f.start_line, **common) for f in funcs]


def _format_result(result: object, path: str | None, hidden: int = 0, min_confidence: float = 0.0) -> str:
    if isinstance(result, Completion):
        return result.text
    if isinstance(result, Docstring):
        return result.indent + result.text
    if isinstance(result, DebugResult):
        note = ""
        if hidden:
            note = (f"({hidden} hint{'s' if hidden != 1 else ''} below confidence {min_confidence:.2f} hidden, "
                    "as in the review; --min-confidence 0 shows them)")
        if not result.hints:
            return "no issue" + (f" {note}" if note else "")
        out = [note] if note else []
        for h in result.hints:
            tag = {"verified": " [verified by running]", "plausible": " [plausible: passes the runs, not confirmed]",
                   "runs": " [from failing runs]"}.get(
                getattr(h, "evidence", "model"), " [model only]")
            msg = h.message if not h.message.startswith("[model only]") else h.message[len("[model only] "):]
            out.append(f"{path or h.path}:{h.line + 1}: {msg} (confidence {h.confidence:.2f}){tag}")
            if h.fix:
                out.append(f"  fix: {h.fix.strip()}")
        return "\n".join(out)
    if isinstance(result, Explanation):
        return result.text
    return str(result)


def main(argv: Sequence[str] | None = None) -> int:
    """``moecoder complete|comment|debug|explain ...``: stream reasoning (dim), then the answer."""
    import dataclasses
    import json

    from rich.console import Console

    args_in = list(sys.argv[1:] if argv is None else argv)
    err = Console(stderr=True, highlight=False)
    if not args_in or args_in[0] not in TASKS:
        err.print(f"moecoder: error: expected one of {', '.join(TASKS)}", markup=False)
        return 2
    task = args_in[0]
    parser = _parser(task)
    try:
        args = parser.parse_args(args_in[1:])
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    try:
        requests = _requests(task, args)
        for t in getattr(args, "tests", None) or []:
            from pathlib import Path

            if not Path(t.split("::", 1)[0]).exists():
                raise UsageError(f"--tests {t}: no such file")
    except UsageError as e:
        print(f"moecoder {task}: error: {e}", file=sys.stderr)
        return 2
    out = Console(highlight=False, soft_wrap=True)
    from assistant.config import load_settings
    from assistant.engine import Engine, EngineError

    try:
        settings = load_settings()
        min_conf = getattr(args, "min_confidence", None)
        min_conf = settings.review.min_confidence if min_conf is None else min_conf
        if not 0.0 <= min_conf <= 1.0:
            raise ValueError("--min-confidence must be between 0 and 1")
        engine = Engine.from_settings(settings.for_face("tasks"), args.model)
    except (ValueError, OSError) as e:
        print(f"moecoder {task}: error: {str(e).splitlines()[0] if str(e) else e}", file=sys.stderr)
        return 2
    results = []
    run_code = task == "debug" and (args.run or bool(args.tests))
    try:
        for req in requests:
            if len(requests) > 1:
                out.print(f"[bold]{req.function}[/bold]")
            result = None
            in_reasoning = False
            if run_code:
                from assistant.debugging import DebugOptions, debug_stream

                opts = DebugOptions(tests=tuple(args.tests), repo_tests=not args.no_repo_tests, budget_s=args.budget)
                events = debug_stream(engine, req.path or args.target, req.source, [req.function], opts)
            else:
                events = engine.stream(req)
            for ev in events:
                if ev.kind == "reasoning" and not args.no_reasoning and not args.json:
                    out.out(ev.text, style="dim", end="", highlight=False)
                    in_reasoning = True
                elif ev.kind == "answer" and task == "complete" and not args.json:
                    pass  # completions are shown after the post-filters
                elif ev.kind == "error":
                    raise EngineError(ev.text)
                elif ev.kind == "done":
                    result = ev.result
            if in_reasoning:
                out.out("")
            hidden = 0
            if isinstance(result, DebugResult):  # the review's threshold, said when it hides something
                kept = [h for h in result.hints if h.confidence >= min_conf]
                hidden = len(result.hints) - len(kept)
                result = dataclasses.replace(result, hints=kept)
            results.append(result)
            if not args.json:
                out.out(_format_result(result, req.path, hidden, min_conf), highlight=False)
    except EngineError as e:
        print(f"moecoder {task}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        engine.close()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in results], indent=2))
    return 0
