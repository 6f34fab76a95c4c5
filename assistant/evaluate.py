# Longer than 600 lines because it holds one suite per benchmark; its scoring moves onto the product
# path in #15, after which the suites split out.
"""``moecoder eval``: measure a model on held-out code and external benchmarks.

    moecoder eval --model DIR [--suite bpb,fim,mbpp,mbpp-infill,quixbugs,bugs,docstrings]
                  [--limit N] [--json OUT] [--data DIR] [--task-data DIR] [--eval-dir DIR]

Suites (every one takes ``--limit`` so CI can smoke-test it on the tiny model in seconds):

* ``bpb`` — bits per byte of held-out code (the test split of ``--data``, a corpus or packed
  directory; without it, this project's own source, which is never in its training corpus).
* ``fim`` — single-line fill-in-the-middle on the same held-out code: a seeded sample of lines,
  the middle is the whole line, prefix and suffix clipped to the context; exact match (trailing
  whitespace stripped) and edit similarity (1 - Levenshtein / longer length).
* ``mbpp`` — MBPP (sanitized) pass@1, greedy: prompt = the task as a comment, one test as an
  example, and the function signature from the reference solution; the asserts run in the
  subprocess sandbox (:mod:`assistant.sandbox`) with a timeout.
* ``mbpp-infill`` — one line of each reference solution masked and filled in: exact match and
  whether the tests still pass.
* ``quixbugs`` — the debug task on each buggy program: top-1 bug-line localisation (the line
  differing from the fixed version) and repair (the proposed fix line swapped in, the program's
  pytest file run in the sandbox with a timeout).
* ``bugs`` — the synthetic debug examples of the task data's test split (``--task-data``; else
  generated from held-out code): precision and recall of findings (a true positive names the
  injected line), and the false-alarm rate on untouched functions.
* ``docstrings`` — the comment task on held-out functions: ROUGE-L F1 against their real docstrings.

Scoring goes through a *predictor* (the model, or in tests an oracle), so the metrics themselves
are tested with known-perfect and known-wrong answers.
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import difflib
import json
import os
import platform
import random
import re
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from assistant import sandbox
from model.formats import Finding, fim_prompt, number_lines, parse_finding

SUITES = ("bpb", "fim", "mbpp", "mbpp-infill", "quixbugs", "bugs", "docstrings", "repo-fim")
DEFAULT_LIMITS = {"bpb": 200, "fim": 500, "mbpp": 427, "mbpp-infill": 427, "quixbugs": 40, "bugs": 500,
                  "docstrings": 300, "repo-fim": 200}  # fmt: skip
MBPP_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\nassert ", "\n#")


class EvalError(Exception):
    """A usage problem (missing data, bad directory): one line, exit code 2."""


# --------------------------------------------------------------------------- metrics


def exact_match(pred: str, ref: str) -> bool:
    """Equal after stripping trailing whitespace (newlines included); indentation must match."""
    return pred.rstrip() == ref.rstrip()


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insertions, deletions, substitutions of one item), by ``rapidfuzz``."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def edit_similarity(pred: str, ref: str) -> float:
    """1 - Levenshtein(pred, ref) / max(len): 1.0 for identical strings, 0.0 for nothing in common."""
    pred, ref = pred.rstrip(), ref.rstrip()
    n = max(len(pred), len(ref))
    return 1.0 if n == 0 else 1.0 - levenshtein(pred, ref) / n


_WORD = re.compile(r"\w+")


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over lower-cased word tokens (longest common subsequence)."""
    p, r = _WORD.findall(pred.lower()), _WORD.findall(ref.lower())
    if not p or not r:
        return 1.0 if p == r else 0.0
    prev = [0] * (len(r) + 1)
    for tp in p:
        cur = [0]
        for j, tr in enumerate(r, 1):
            cur.append(prev[j - 1] + 1 if tp == tr else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def debug_scores(pairs: Iterable[tuple[int | None, Finding | None | str]]) -> dict:
    """(true bug line or None for an untouched function, predicted finding / None / "invalid").

    A true positive names the injected line. Precision = TP / findings; recall = TP / bugs;
    false-alarm rate = findings on untouched functions / untouched functions.
    """
    tp = findings = bugs = clean = false_alarms = invalid = detected = 0
    for truth, pred in pairs:
        if pred == "invalid":
            invalid += 1
            pred = None
        if truth is None:
            clean += 1
        else:
            bugs += 1
        if pred is None:
            continue
        findings += 1
        if truth is None:
            false_alarms += 1
        else:
            detected += 1
            tp += pred.line == truth
    precision = tp / findings if findings else 0.0
    recall = tp / bugs if bugs else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "false_alarm_rate": false_alarms / clean if clean else 0.0,
        "detection_recall": detected / bugs if bugs else 0.0,
        "bugs": bugs,
        "clean": clean,
        "findings": findings,
        "true_positives": tp,
        "unparseable": invalid,
    }


# --------------------------------------------------------------------------- predictors


class Predictor(Protocol):
    """What a suite asks of a model. ``None`` in a result means the prompt did not fit the context."""

    def complete(self, prompts: list[str], stops: Sequence[str], max_new_tokens: int) -> list[str | None]: ...
    def fim(
        self, pairs: list[tuple[str, str]], max_new_tokens: int, spm: bool = False
    ) -> list[str | None]: ...
    def task(self, task: str, codes: list[str], max_new_tokens: int) -> list[tuple[str, str] | None]: ...


class ModelPredictor:
    """Greedy decoding with ``model.generate`` (batched), prompts from ``model.formats``."""

    def __init__(self, loaded, batch_size: int = 8, progress: Callable[[int], None] | None = None,
                 loop_guard: int = 0):
        self.model, self.tok, self.cfg = loaded.model, loaded.tokenizer, loaded.config
        self.loop_guard = loop_guard  # for the prose tasks (comment / debug / explain), as the product
        self.ctx = int(self.cfg.max_seq_len)
        self.batch_size = batch_size
        self.progress = progress

    def _generate(self, prompts: list[list[int]], max_new: int, stops: Sequence[str] = (),
                  stop_ids: Sequence[int] = (), loop_guard: int = 0) -> list:  # fmt: skip
        from model.generate import SamplingParams, generate_batch

        fits = [i for i, p in enumerate(prompts) if 0 < len(p) <= self.ctx - 8]
        out: list = [None] * len(prompts)
        fits.sort(key=lambda i: len(prompts[i]))
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop_strings=tuple(stops),
                                stop_token_ids=tuple(stop_ids), loop_guard=loop_guard)  # fmt: skip
        for a in range(0, len(fits), self.batch_size):
            idx = fits[a : a + self.batch_size]
            res = generate_batch(
                self.model, self.tok, [prompts[i] for i in idx], params, batch_size=self.batch_size
            )
            for i, r in zip(idx, res):
                out[i] = r
            if self.progress:
                self.progress(len(idx))
        if self.progress:
            self.progress(len(prompts) - len(fits))
        return out

    def complete(self, prompts, stops, max_new_tokens):
        ids = [[self.tok.eos_id, *self.tok.encode(p)] for p in prompts]
        return [None if r is None else r.text for r in self._generate(ids, max_new_tokens, stops)]

    def fim(self, pairs, max_new_tokens, spm=False):
        from assistant.prompts import fim_stop_ids

        stop_ids = list(fim_stop_ids(self.tok))
        ids = [fim_prompt(self.tok, p, s, spm=spm and getattr(self.tok, "fim_spm", True)) for p, s in pairs]
        return [None if r is None else r.text for r in self._generate(ids, max_new_tokens, ("\n",), stop_ids)]

    def task(self, task, codes, max_new_tokens):
        from assistant import prompts

        ids = [prompts.task_prompt(self.tok, task, c) for c in codes]  # our format or the checkpoint's own
        think_end = prompts.think_end_id(self.tok)
        marker = prompts.answer_marker(self.tok)
        out = []
        for r in self._generate(ids, max_new_tokens, loop_guard=self.loop_guard):
            if r is None:
                out.append(None)
                continue
            toks = [t for t in r.token_ids if t != self.tok.eos_id and t not in getattr(self.tok, "stop_ids", ())]
            if marker is not None:
                out.append(prompts.split_text(self.tok.decode(toks), marker))
            elif think_end in toks:
                k = toks.index(think_end)
                out.append((self.tok.decode(toks[:k]), self.tok.decode(toks[k + 1 :])))
            else:  # never closed its reasoning: no answer
                out.append((self.tok.decode(toks), ""))
        return out


# --------------------------------------------------------------------------- data


def _project_files() -> list[Path]:
    """This project's own Python source: real code that is never in its training corpus
    (the corpus is built from site-packages and the standard library)."""
    root = Path(__file__).resolve().parents[1]
    files: list[Path] = []
    for sub in ("assistant", "model", "kernels", "lsp", "tui", "scripts"):
        files += sorted((root / sub).rglob("*.py"))
    return [p for p in files if p.stat().st_size > 400]


def heldout_sources(
    data: str | Path | None, limit: int, seed: int = 0, tok=None
) -> tuple[list[tuple[str, str]], str]:
    """(path, text) of held-out code and a description of where it came from."""
    rng = random.Random(seed)
    if data is None:
        files = _project_files()
        rng.shuffle(files)
        out = []
        root = Path(__file__).resolve().parents[1]
        for p in files[:limit]:
            try:
                out.append((str(p.relative_to(root)), p.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError):
                continue
        return out, "moecoder's own source (held out: the corpus is site-packages + stdlib)"
    d = Path(data)
    shards = sorted((d / "test").glob("shard-*.jsonl"))
    if shards:
        recs = []
        for s in shards:
            with s.open(encoding="utf-8") as fh:
                recs += [json.loads(line) for line in fh if line.strip()]
        rng.shuffle(recs)
        return [(str(r.get("path", "")), r.get("text", "")) for r in recs[:limit]], f"{d} test split (corpus)"
    meta_path = d / "meta.json"
    if meta_path.is_file() and (d / "test.bin").is_file():
        import numpy as np

        meta = json.loads(meta_path.read_text())
        if meta.get("kind") == "tasks":
            raise EvalError(f"{d} holds task data; pass it as --task-data")
        if tok is None:
            raise EvalError("decoding packed tokens needs the model's tokenizer")
        toks = np.memmap(d / "test.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        offs = np.load(d / "test.idx")
        order = list(range(len(offs) - 1))
        rng.shuffle(order)
        out = []
        for k in order[:limit]:
            ids = [int(t) for t in toks[offs[k] : offs[k + 1]] if int(t) != tok.eos_id]
            out.append((f"test#{k}", tok.decode(ids)))
        return out, f"{d} test split (packed)"
    raise EvalError(
        f"--data {d}: neither a corpus (test/shard-*.jsonl) nor a packed directory (meta.json, test.bin)"
    )


def _eval_dir(eval_dir: str | Path | None) -> Path:
    if eval_dir is not None:
        return Path(eval_dir)
    from model.data.eval_overlap import default_eval_dir

    return default_eval_dir()


_WHERE = " (the external benchmarks are not installed with moecoder: pass --eval-dir DIR or set MOECODER_EVAL_DIR)"
EXTERNAL = {"mbpp": ("mbpp", "sanitized-mbpp.json"), "mbpp-infill": ("mbpp", "sanitized-mbpp.json"),
            "quixbugs": ("quixbugs", "quixbugs_python.jsonl")}


def load_mbpp(eval_dir: Path) -> list[dict]:
    path = eval_dir / "mbpp" / "sanitized-mbpp.json"
    if not path.is_file():
        raise EvalError(f"MBPP not found: {path}{_WHERE}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_quixbugs(eval_dir: Path) -> list[dict]:
    path = eval_dir / "quixbugs" / "quixbugs_python.jsonl"
    if not path.is_file():
        raise EvalError(f"QuixBugs not found: {path}{_WHERE}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- suite plumbing


@dataclass
class Context:
    predictor: Any
    limit: int | None = None
    seed: int = 0
    data: str | Path | None = None
    task_data: str | Path | None = None
    eval_dir: Path | None = None
    tokenizer: Any = None
    jobs: int = 4
    timeout: float = 10.0
    max_new_tokens: int = 256
    progress: Callable[[str, int, int], None] | None = None
    extra: dict = field(default_factory=dict)

    def n(self, suite: str) -> int:
        return self.limit if self.limit is not None else DEFAULT_LIMITS[suite]


def _run_parallel(
    fn: Callable, items: list, jobs: int, progress: Callable[[int, int], None] | None = None
) -> list:
    """``[fn(x) for x in items]`` on ``jobs`` threads (each call waits on a sandbox subprocess)."""
    out: list = []
    if jobs <= 1 or len(items) <= 1:
        for x in items:
            out.append(fn(x))
            if progress:
                progress(len(out), len(items))
        return out
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        for r in ex.map(fn, items):
            out.append(r)
            if progress:
                progress(len(out), len(items))
    return out


def _tests_progress(ctx: Context, suite: str) -> Callable[[int, int], None] | None:
    if ctx.progress is None:
        return None
    return lambda done, total: ctx.progress(f"{suite} tests", done, total)


# --------------------------------------------------------------------------- bpb


def suite_bpb(ctx: Context, model=None) -> dict:
    """Bits per byte: sum of -log2 p over every token of each held-out document / its bytes."""
    import math

    import torch

    tok = ctx.tokenizer
    if model is None:
        raise EvalError("bpb needs a model")
    sources, where = heldout_sources(ctx.data, ctx.n("bpb"), ctx.seed, tok)
    L = int(model.cfg.max_seq_len)
    max_tokens = 8 * L
    total_nats = 0.0
    total_bytes = total_tokens = 0
    device = model.tok_emb.weight.device
    for k, (_path, text) in enumerate(sources):
        ids = tok.encode(text)[:max_tokens]
        if not ids:
            continue
        seq = [tok.eos_id, *ids]  # as in training, a document follows an eos
        # windows of L tokens overlapping by one, so that every token of ids is predicted once
        for a in range(0, len(seq) - 1, L - 1):
            w = seq[a : a + L]
            x = torch.tensor([w], dtype=torch.long, device=device)
            with torch.inference_mode():
                logp = model(x[:, :-1]).float().log_softmax(-1)[0]
            total_nats -= logp.gather(-1, x[0, 1:, None]).sum().item()
        total_tokens += len(ids)
        total_bytes += len(tok.decode_bytes(ids))
        if ctx.progress:
            ctx.progress("bpb", k + 1, len(sources))
    bpb = total_nats / math.log(2) / total_bytes if total_bytes else float("nan")
    return {"bits_per_byte": bpb, "tokens": total_tokens, "bytes": total_bytes, "docs": len(sources),
            "source": where, "n": len(sources)}  # fmt: skip


# --------------------------------------------------------------------------- fim


def _clip_lines(text: str, budget: int, tok, keep_end: bool) -> str:
    """Drop whole lines from the far end (the start when ``keep_end``) until ``text`` fits ``budget`` tokens."""
    cap = budget * 8
    lines = text.split("\n")
    if len(text) > cap:
        lines = (text[-cap:] if keep_end else text[:cap]).split("\n")
        lines = lines[1:] if keep_end else lines[:-1]  # a line cut in the middle goes
    while lines and tok.count("\n".join(lines)) > budget:
        drop = len(lines) // 8 + 1
        lines = lines[drop:] if keep_end else lines[:-drop]
    return "\n".join(lines)


def fim_items(
    sources: list[tuple[str, str]], n: int, seed: int, tok, ctx_len: int, max_new: int
) -> list[dict]:
    rng = random.Random(seed)
    items = []
    candidates = []
    for path, text in sources:
        lines = text.split("\n")
        ok = [i for i, line in enumerate(lines[:-1]) if 4 <= len(line.strip()) <= 120]
        if ok:
            candidates.append((path, lines, ok))
    if not candidates:
        return []
    budget = max(16, ctx_len - max_new - 8)
    for k in range(n):
        path, lines, ok = candidates[k % len(candidates)]
        i = rng.choice(ok)
        prefix = "\n".join(lines[:i]) + ("\n" if i else "")
        middle = lines[i] + "\n"
        suffix = "\n".join(lines[i + 1 :])
        if tok is not None:
            prefix = _clip_lines(prefix, budget * 3 // 4, tok, keep_end=True)
            suffix = _clip_lines(suffix, budget // 4, tok, keep_end=False)
        items.append({"path": path, "line": i + 1, "prefix": prefix, "middle": middle, "suffix": suffix,
                      "source": "\n".join(lines)})  # fmt: skip
    return items


def suite_fim(ctx: Context) -> dict:
    ctx_len = ctx.extra.get("ctx_len", 2048)
    sources, where = heldout_sources(ctx.data, max(ctx.n("fim"), 1), ctx.seed, ctx.tokenizer)
    items = fim_items(sources, ctx.n("fim"), ctx.seed, ctx.tokenizer, ctx_len, 64)
    out: dict = {"source": where}
    for order in _fim_orders(ctx):
        preds = ctx.predictor.fim([(it["prefix"], it["suffix"]) for it in items], 64, spm=order == "spm")
        scored = [(it, p) for it, p in zip(items, preds) if p is not None]
        em = [exact_match(p, it["middle"]) for it, p in scored]
        es = [edit_similarity(p, it["middle"]) for it, p in scored]
        n = len(scored)
        sfx = "_spm" if order == "spm" else ""
        out.update(
            {
                f"exact_match{sfx}": sum(em) / n if n else 0.0,
                f"edit_similarity{sfx}": sum(es) / n if n else 0.0,
            }
        )
        out.setdefault("n", n)
        out.setdefault("skipped", len(items) - n)
    return out


def _fim_orders(ctx: Context) -> tuple[str, ...]:
    """PSM (what the assistant sends) first, then SPM; ``ctx.extra["fim_orders"]`` narrows it."""
    return tuple(ctx.extra.get("fim_orders", ("psm", "spm")))


# --------------------------------------------------------------------------- mbpp


def _target_function(task: dict) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(task["code"])
    except SyntaxError:
        return None
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    tests = "\n".join(task.get("test_list", []))
    for f in funcs:
        if re.search(rf"\b{re.escape(f.name)}\s*\(", tests):
            return f
    return funcs[-1] if funcs else None


# how an MBPP task is put to the model: "comment" (the task and one test as comments above the signature) or
# "docstring" (the signature, then the task and one test as a doctest in a docstring: as a user writes a function
# before asking for its body)
MBPP_PROMPT = "comment"


def _doctest_example(test: str, indent: str) -> str | None:
    """``assert f(x) == y`` as the doctest lines ``>>> f(x)`` / ``y`` (None for any other form)."""
    try:
        node = ast.parse(test.strip()).body[0]
    except (SyntaxError, IndexError):
        return None
    if not (isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.ops) == 1
            and isinstance(node.test.ops[0], ast.Eq)):  # fmt: skip
        return None
    return f"{indent}>>> {ast.unparse(node.test.left)}\n{indent}{ast.unparse(node.test.comparators[0])}"


def _task_sentence(prompt: str) -> str:
    """'Write a python function to find x.' -> 'Find x.' (a docstring's summary line)."""
    text = " ".join(prompt.split())
    m = re.match(r"(?i)write\s+(?:a\s+)?(?:python\s+)?(?:function|program|code)\s+(?:to|that|which)\s+", text)
    if m:
        text = text[m.end():]
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def mbpp_prompt(task: dict, style: str | None = None) -> tuple[str, str] | None:
    """(prompt, oracle completion): imports, the task and one test (as comments, or as the docstring with a
    doctest: ``style``, default ``MBPP_PROMPT``), the signature."""
    style = style or MBPP_PROMPT
    fn = _target_function(task)
    if fn is None:
        return None
    code_lines = task["code"].split("\n")
    tree = ast.parse(task["code"])
    imports = [
        ast.get_source_segment(task["code"], n)
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom)
    ]
    header = (
        f"def {fn.name}({ast.unparse(fn.args)})"
        + (f" -> {ast.unparse(fn.returns)}" if fn.returns else "")
        + ":"
    )
    lines = [*imports, *task.get("test_imports", [])]
    if style == "docstring":
        example = _doctest_example(task["test_list"][0], "    ") if task.get("test_list") else None
        doc = [f'    """{_task_sentence(task["prompt"])}']
        if example:
            doc += ["", example]
        doc.append('    """')
        prompt = "\n".join(lines) + ("\n\n\n" if lines else "") + header + "\n" + "\n".join(doc) + "\n"
    else:
        text = " ".join(task["prompt"].split())
        lines.append(f"# {text}")
        if task.get("test_list"):
            lines.append(f"# Example: {task['test_list'][0]}")
        prompt = "\n".join(lines) + "\n" + header + "\n"
    # the oracle: the reference body, then any other top-level code (helpers) of the reference
    body = "\n".join(code_lines[fn.body[0].lineno - 1 : fn.end_lineno])
    if fn.body[0].lineno == fn.lineno:  # one-line def
        body = "    " + code_lines[fn.lineno - 1].split(":", 1)[1].strip()
    others = [ast.get_source_segment(task["code"], n) for n in tree.body
              if n is not fn and not isinstance(n, ast.Import | ast.ImportFrom)]  # fmt: skip
    if style == "docstring":  # the body under a four-space docstring: four spaces too
        body = textwrap.indent(textwrap.dedent(body), "    ")
    oracle = body + ("\n\n" + "\n\n".join(o for o in others if o) if others else "") + "\n"
    return prompt, oracle


def mbpp_program(task: dict, code: str) -> str:
    return (
        code.rstrip() + "\n\n" + "\n".join([*task.get("test_imports", []), *task.get("test_list", [])]) + "\n"
    )


def _run_tests(program: str, timeout: float) -> bool:
    return sandbox.run_code(program, timeout=timeout, memory_mb=2048).ok


def suite_mbpp(ctx: Context) -> dict:
    tasks = load_mbpp(_eval_dir(ctx.eval_dir))[: ctx.n("mbpp")]
    built = [(t, mbpp_prompt(t)) for t in tasks]
    built = [(t, p) for t, p in built if p is not None]
    preds = ctx.predictor.complete([p[0] for _, p in built], MBPP_STOPS, ctx.max_new_tokens)
    runs = [(t, p[0] + pred) for (t, p), pred in zip(built, preds) if pred is not None]
    passed = _run_parallel(
        lambda tp: _run_tests(mbpp_program(tp[0], tp[1]), ctx.timeout),
        runs,
        ctx.jobs,
        _tests_progress(ctx, "mbpp"),
    )
    n = len(runs)
    return {"pass@1": sum(passed) / n if n else 0.0, "passed": sum(passed), "n": n,
            "skipped": len(tasks) - n, "failed_ids": [t["task_id"] for (t, _), ok in zip(runs, passed) if not ok][:50]}  # fmt: skip


def mbpp_infill_items(tasks: list[dict], seed: int) -> list[dict]:
    items = []
    for t in tasks:
        lines = t["code"].split("\n")
        ok = [i for i, line in enumerate(lines) if line.startswith((" ", "\t")) and line.strip()
              and not line.strip().startswith("#")]  # fmt: skip
        if not ok:
            continue
        i = random.Random(f"{seed}:{t['task_id']}").choice(ok)
        items.append({"task": t, "line": i + 1, "prefix": "\n".join(lines[:i]) + "\n", "middle": lines[i] + "\n",
                      "suffix": "\n".join(lines[i + 1 :])})  # fmt: skip
    return items


def suite_mbpp_infill(ctx: Context) -> dict:
    tasks = load_mbpp(_eval_dir(ctx.eval_dir))[: ctx.n("mbpp-infill")]
    items = mbpp_infill_items(tasks, ctx.seed)

    def check(ip):
        it, p = ip
        code = it["prefix"] + p.rstrip("\n") + "\n" + it["suffix"]
        return _run_tests(mbpp_program(it["task"], code), ctx.timeout)

    out: dict = {}
    for order in _fim_orders(ctx):
        preds = ctx.predictor.fim([(it["prefix"], it["suffix"]) for it in items], 64, spm=order == "spm")
        scored = [(it, p) for it, p in zip(items, preds) if p is not None]
        em = [exact_match(p, it["middle"]) for it, p in scored]
        passed = _run_parallel(check, scored, ctx.jobs, _tests_progress(ctx, f"mbpp-infill {order}"))
        n = len(scored)
        sfx = "_spm" if order == "spm" else ""
        out.update({f"exact_match{sfx}": sum(em) / n if n else 0.0, f"pass{sfx}": sum(passed) / n if n else 0.0,
                    f"passed{sfx}": sum(passed)})  # fmt: skip
        out.setdefault("n", n)
        out.setdefault("skipped", len(items) - n)
    return out


# --------------------------------------------------------------------------- quixbugs


def _program_only(code: str) -> list[str]:
    """The program's lines without the trailing spec string and surrounding blank lines."""
    lines = code.split("\n")
    try:
        tree = ast.parse(code)
        cut = len(lines)
        while (
            tree.body
            and isinstance(tree.body[-1], ast.Expr)
            and isinstance(getattr(tree.body[-1], "value", None), ast.Constant)
        ):
            cut = tree.body[-1].lineno - 1
            tree.body.pop()
        lines = lines[:cut]
    except SyntaxError:
        pass
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _strip_comment(line: str) -> str:
    return (
        line.split("#", 1)[0].rstrip()
        if "#" in line and "'" not in line and '"' not in line
        else line.rstrip()
    )


def quixbugs_item(rec: dict) -> dict:
    """The program as shown (1-based lines), the bug lines, and the oracle's finding."""
    buggy, fixed = _program_only(rec["buggy_code"]), _program_only(rec["fixed_code"])
    sm = difflib.SequenceMatcher(a=buggy, b=fixed, autojunk=False)
    bug_lines: set[int] = set()
    oracle: Finding | None = None
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            continue
        if op == "insert":
            bug_lines |= {i1, i1 + 1}
            continue
        bug_lines |= set(range(i1 + 1, i2 + 1))
        if op == "replace" and i2 - i1 == 1 and j2 - j1 == 1 and oracle is None:
            if _strip_comment(buggy[i1]) != _strip_comment(fixed[j1]):  # a real change, not a comment
                oracle = Finding(i1 + 1, "bug", fixed[j1].strip())
    if oracle is None:  # a missing line: name where it goes; no one-line replacement repairs it
        for op, i1, _i2, _j1, _j2 in sm.get_opcodes():
            if op == "insert":
                oracle = Finding(min(i1 + 1, len(buggy)), "a line is missing here", None)
                break
    return {"name": rec["name"], "lines": buggy, "bug_lines": sorted(x for x in bug_lines if x >= 1),
            "oracle": oracle, "rec": rec}  # fmt: skip


def quixbugs_files(qb_root: Path, rec: dict, program: str) -> dict:
    name = rec["name"]
    files: dict = {
        "conftest.py": qb_root / "conftest.py",
        f"python_programs/{name}.py": program,
        f"python_testcases/test_{name}.py": qb_root / rec["pytest_file"],
        "python_testcases/load_testdata.py": qb_root / "python_testcases" / "load_testdata.py",
        "python_testcases/node.py": qb_root / "python_testcases" / "node.py",
        "python_programs/node.py": qb_root / "python_programs" / "node.py",
    }
    if rec.get("json_testcases"):
        files[rec["json_testcases"]] = qb_root / rec["json_testcases"]
    return {k: v for k, v in files.items() if isinstance(v, str) or Path(v).is_file()}


def apply_fix(lines: list[str], f: Finding) -> str | None:
    if f.fix is None or not 1 <= f.line <= len(lines):
        return None
    old = lines[f.line - 1]
    indent = old[: len(old) - len(old.lstrip())]
    new = list(lines)
    new[f.line - 1] = indent + f.fix.strip()
    return "\n".join(new) + "\n"


def run_quixbugs_tests(qb_root: Path, rec: dict, program: str, timeout: float) -> bool:
    r = sandbox.run_pytest(quixbugs_files(qb_root, rec, program), [f"python_testcases/test_{rec['name']}.py"],
                           timeout=timeout)  # fmt: skip
    return r.ok


def _parse(answer: str) -> Finding | None | str:
    try:
        return parse_finding(answer)
    except ValueError:
        return "invalid"


def _score_quixbugs(ctx: Context, root: Path, rows: list[dict], to_run: list[tuple]) -> dict:
    """Run each proposed program (row, item, source) against its QuixBugs tests; the shared scores."""
    results = _run_parallel(lambda x: run_quixbugs_tests(root, x[1]["rec"], x[2], 3 * ctx.timeout), to_run,
                            ctx.jobs, _tests_progress(ctx, "quixbugs"))  # fmt: skip
    for (row, _, _), ok in zip(to_run, results):
        row["repaired"] = ok
    done = [r for r in rows if not r["skipped"]]
    n = len(done)
    loc, rep = sum(r["localised"] for r in done), sum(r["repaired"] for r in done)
    return {"localisation_top1": loc / n if n else 0.0, "repair_pass": rep / n if n else 0.0,
            "localised": loc, "repaired": rep, "n": n, "skipped": len(rows) - n, "programs": rows}  # fmt: skip


def suite_quixbugs(ctx: Context) -> dict:
    root = _eval_dir(ctx.eval_dir) / "quixbugs"
    items = [quixbugs_item(r) for r in load_quixbugs(_eval_dir(ctx.eval_dir))][: ctx.n("quixbugs")]
    preds = ctx.predictor.task(
        "debug", [number_lines("\n".join(it["lines"])) for it in items], ctx.max_new_tokens
    )
    rows = []
    to_run = []
    for it, p in zip(items, preds):
        row = {"name": it["name"], "bug_lines": it["bug_lines"], "skipped": p is None}
        if p is not None:
            f = _parse(p[1])
            row["answer"] = p[1][:200]
            row["localised"] = isinstance(f, Finding) and f.line in it["bug_lines"]
            program = apply_fix(it["lines"], f) if isinstance(f, Finding) else None
            row["repaired"] = False
            if program is not None:
                to_run.append((row, it, program))
        rows.append(row)
    repairable = sum(1 for it in items if it["oracle"] is not None and it["oracle"].fix is not None)
    return {**_score_quixbugs(ctx, root, rows, to_run), "one_line_repairable": repairable}


# --------------------------------------------------------------------------- synthetic bugs, docstrings


def _task_records(ctx: Context, task: str, n: int) -> tuple[list[dict], str]:
    if ctx.task_data is not None:
        path = Path(ctx.task_data) / "test.jsonl"
        if not path.is_file():
            raise EvalError(f"--task-data {ctx.task_data}: no test.jsonl")
        recs = []
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                r = json.loads(line)
                if r.get("task") == task:
                    recs.append(r)
        random.Random(ctx.seed).shuffle(recs)
        return recs[:n], f"{path}"
    from model.data.tasks import EvalOverlap, examples_for_source

    sources, where = heldout_sources(ctx.data, max(n, 200), ctx.seed, ctx.tokenizer)
    overlap = EvalOverlap(ctx.eval_dir)
    recs = []
    for path, text in sources:  # sources are already shuffled; stop once there is plenty to sample from
        recs += [e for e in examples_for_source(text, path, "heldout", overlap) if e["task"] == task]
        if len(recs) >= 4 * n:
            break
    random.Random(ctx.seed).shuffle(recs)
    return recs[:n], f"generated from {where}"


def suite_bugs(ctx: Context) -> dict:
    recs, where = _task_records(ctx, "debug", ctx.n("bugs"))
    preds = ctx.predictor.task("debug", [r["code"] for r in recs], ctx.max_new_tokens)
    pairs = []
    fixed = 0
    by_kind: dict[str, list[int]] = {}
    for r, p in zip(recs, preds):
        if p is None:
            continue
        truth, pred = parse_finding(r["answer"]), _parse(p[1])
        pairs.append((None if truth is None else truth.line, pred))
        hit = isinstance(pred, Finding) and truth is not None and pred.line == truth.line
        if hit and pred.fix is not None and truth.fix is not None and pred.fix.strip() == truth.fix.strip():
            fixed += 1
        if truth is not None:
            k = by_kind.setdefault(str(r.get("bug") or "unknown"), [0, 0])
            k[0] += hit
            k[1] += 1
    out = debug_scores(pairs)
    out["fix_exact"] = fixed / out["bugs"] if out["bugs"] else 0.0  # right line and the original line as fix
    out["recall_by_kind"] = {k: v[0] / v[1] for k, v in sorted(by_kind.items())}
    out.update({"n": len(pairs), "skipped": len(recs) - len(pairs), "source": where})
    return out


def suite_docstrings(ctx: Context) -> dict:
    recs, where = _task_records(ctx, "comment", ctx.n("docstrings"))
    preds = ctx.predictor.task("comment", [r["code"] for r in recs], ctx.max_new_tokens)
    scores = [rouge_l(p[1], r["answer"]) for r, p in zip(recs, preds) if p is not None]
    n = len(scores)
    return {"rouge_l_f1": sum(scores) / n if n else 0.0, "n": n, "skipped": len(recs) - n, "source": where}


# --------------------------------------------------------------------------- the product's path
#
# What a user gets: each item goes through ``assistant.tasks`` on an ``Engine`` built with the
# product's default settings (the completion prompt cap, per-task token limits), so the context
# manager, the completion post-filters, the debug gate + consistency checks, the loose answer
# parser and the docstring renderer all take part. Completions put the cursor where an editor
# leaves it: after the line's indentation. Debug hints count only at or above the review's
# default ``min_confidence`` (what the review and the editor show).


class ProductRunner:
    """Runs ``TaskRequest``s through ``assistant.tasks.iter_batch`` on one engine."""

    def __init__(self, engine, batch_size: int = 8, min_confidence: float = 0.5,
                 progress: Callable[[int], None] | None = None):  # fmt: skip
        self.engine = engine
        self.batch_size = batch_size
        self.min_confidence = min_confidence
        self.progress = progress

    def run(self, requests: list) -> list:
        """Results in order (an exception object for a request that failed)."""
        from assistant.tasks import iter_batch

        out: list = [None] * len(requests)
        for i, r in iter_batch(self.engine, requests, batch_size=self.batch_size):
            out[i] = r
            if self.progress:
                self.progress(1)
        return out


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def completion_request(source_lines: list[str], i: int, max_new: int | None = None, related=(),
                       path: str | None = None) -> tuple[Any, str]:  # fmt: skip
    """(a ``complete`` request at line ``i``, cursor after the indentation, the rest of the line
    removed; the removed text = the reference)."""
    from assistant.tasks import TaskRequest

    line = source_lines[i]
    ind = _indent(line)
    lines = [*source_lines[:i], ind, *source_lines[i + 1 :]]
    req = TaskRequest("complete", "\n".join(lines), path=path, line=i, column=len(ind), max_new_tokens=max_new,
                      related=list(related))  # fmt: skip
    return req, line[len(ind) :]


def _text(result) -> str | None:
    return None if isinstance(result, BaseException) or result is None else result.text


def product_fim(ctx: Context) -> dict:
    runner: ProductRunner = ctx.extra["runner"]
    ctx_len = ctx.extra.get("ctx_len", 2048)
    sources, where = heldout_sources(ctx.data, max(ctx.n("fim"), 1), ctx.seed, ctx.tokenizer)
    items = fim_items(sources, ctx.n("fim"), ctx.seed, ctx.tokenizer, ctx_len, 64)
    reqs, refs = [], []
    for it in items:
        req, ref = completion_request(it["source"].split("\n"), it["line"] - 1)
        reqs.append(req)
        refs.append(ref)
    preds = runner.run(reqs)
    scored = [(ref, _text(p)) for ref, p in zip(refs, preds) if _text(p) is not None]
    n = len(scored)
    out = {"exact_match": sum(exact_match(p, r) for r, p in scored) / n if n else 0.0,
           "edit_similarity": sum(edit_similarity(p, r) for r, p in scored) / n if n else 0.0,
           "multiline": sum(bool(getattr(p, "multiline", False)) for p in preds if not isinstance(p, BaseException)),
           "n": n, "skipped": len(items) - n, "source": where}  # fmt: skip
    roots = [Path(r).resolve() for r in ctx.extra.get("repos") or []]
    if roots:  # the same lines again with the package's memory, as the editor gives it (repositoryContext)
        reqs2, refs2, sc0, at2 = [], [], [], []
        for k, (it, ref, pred) in enumerate(zip(items, refs, preds)):
            src = Path(it["path"]).resolve()
            root = next((r for r in roots if src.is_relative_to(r)), None)
            if root is None:
                continue
            req, _ = completion_request(it["source"].split("\n"), it["line"] - 1, path=str(src))
            req.repo, req.recent = str(root), []
            reqs2.append(req)
            refs2.append(ref)
            at2.append(k)
            if _text(pred) is not None:
                sc0.append((ref, _text(pred)))
        preds2 = runner.run(reqs2)
        sc = [(ref, _text(p)) for ref, p in zip(refs2, preds2) if _text(p) is not None]
        m = len(sc)
        out.update({"n_repo": m,
                    "exact_match_repo_without": sum(exact_match(p, r) for r, p in sc0) / len(sc0) if sc0 else 0.0,
                    "exact_match_repo": sum(exact_match(p, r) for r, p in sc) / m if m else 0.0,
                    "edit_similarity_repo": sum(edit_similarity(p, r) for r, p in sc) / m if m else 0.0})  # fmt: skip
    if ctx.extra.get("items"):  # each line, its reference and the completions: to read the misses
        recs = [{"path": it["path"], "line": it["line"], "reference": ref, "completion": _text(p),
                 "multiline": bool(getattr(p, "multiline", False))} for it, ref, p in zip(items, refs, preds)]
        if roots:
            for k, p in zip(at2, preds2):
                recs[k]["completion_repo"] = _text(p)
        out["items"] = recs
    raw_pred = ctx.extra.get("raw_predictor")
    if raw_pred is not None:  # the model alone: whole-line middle, prefix/suffix clipped, no post-filters
        raw = raw_pred.fim([(it["prefix"], it["suffix"]) for it in items], 64, spm=True)
        rs = [(it, p) for it, p in zip(items, raw) if p is not None]
        out["raw_exact_match_spm"] = sum(exact_match(p, it["middle"]) for it, p in rs) / len(rs) if rs else 0.0
    return out


def product_mbpp(ctx: Context) -> dict:
    from assistant.tasks import TaskRequest

    runner: ProductRunner = ctx.extra["runner"]
    tasks = load_mbpp(_eval_dir(ctx.eval_dir))[: ctx.n("mbpp")]
    built = [(t, mbpp_prompt(t)) for t in tasks]
    built = [(t, p[0]) for t, p in built if p is not None]
    reqs = []
    for _t, prompt in built:
        src = prompt + "    "
        reqs.append(TaskRequest("complete", src, line=src.count("\n"), column=4, max_new_tokens=ctx.max_new_tokens))
    preds = runner.run(reqs)
    runs = [(t, prompt + "    " + _text(p)) for (t, prompt), p in zip(built, preds) if _text(p) is not None]
    passed = _run_parallel(lambda tp: _run_tests(mbpp_program(tp[0], tp[1]), ctx.timeout), runs, ctx.jobs,
                           _tests_progress(ctx, "mbpp"))  # fmt: skip
    n = len(runs)
    return {"pass@1": sum(passed) / n if n else 0.0, "passed": sum(passed), "n": n, "skipped": len(tasks) - n,
            "max_new_tokens": ctx.max_new_tokens,
            "failed_ids": [t["task_id"] for (t, _), ok in zip(runs, passed) if not ok][:50]}  # fmt: skip


def product_mbpp_infill(ctx: Context) -> dict:
    runner: ProductRunner = ctx.extra["runner"]
    tasks = load_mbpp(_eval_dir(ctx.eval_dir))[: ctx.n("mbpp-infill")]
    items = mbpp_infill_items(tasks, ctx.seed)
    reqs, refs = [], []
    for it in items:
        src_lines = (it["prefix"] + it["middle"] + it["suffix"]).split("\n")
        req, ref = completion_request(src_lines, it["line"] - 1)
        reqs.append(req)
        refs.append(ref)
    preds = runner.run(reqs)
    scored = [(it, ref, _text(p)) for it, ref, p in zip(items, refs, preds) if _text(p) is not None]

    def check(x):
        it, _ref, p = x
        code = it["prefix"] + _indent(it["middle"]) + p.rstrip("\n") + "\n" + it["suffix"]
        return _run_tests(mbpp_program(it["task"], code), ctx.timeout)

    passed = _run_parallel(check, scored, ctx.jobs, _tests_progress(ctx, "mbpp-infill"))
    n = len(scored)
    return {"exact_match": sum(exact_match(p, r) for _, r, p in scored) / n if n else 0.0,
            "pass": sum(passed) / n if n else 0.0, "passed": sum(passed), "n": n, "skipped": len(items) - n}  # fmt: skip


def _top_hint(result, min_confidence: float):
    hints = [] if isinstance(result, BaseException) or result is None else list(result.hints)
    hints = [h for h in hints if h.confidence >= min_confidence]
    return max(hints, key=lambda h: h.confidence) if hints else None


def _def_line(lines: list[str], name: str = "") -> int:
    if name:
        for i, ln in enumerate(lines):
            if re.match(rf"\s*(async\s+)?def\s+{re.escape(name)}\s*\(", ln):
                return i
    for i, ln in enumerate(lines):
        if re.match(r"\s*(async\s+)?def\s", ln):
            return i
    return 0


def product_quixbugs(ctx: Context) -> dict:
    from assistant.tasks import TaskRequest

    runner: ProductRunner = ctx.extra["runner"]
    root = _eval_dir(ctx.eval_dir) / "quixbugs"
    items = [quixbugs_item(r) for r in load_quixbugs(_eval_dir(ctx.eval_dir))][: ctx.n("quixbugs")]
    reqs = [TaskRequest("debug", "\n".join(it["lines"]) + "\n", path=f"{it['name']}.py",
                        line=_def_line(it["lines"], it["name"])) for it in items]  # fmt: skip
    preds = runner.run(reqs)
    rows, to_run = [], []
    for it, p in zip(items, preds):
        h = _top_hint(p, runner.min_confidence)
        row = {"name": it["name"], "bug_lines": it["bug_lines"], "skipped": isinstance(p, BaseException),
               "hint_line": None if h is None else h.line + 1, "confidence": None if h is None else h.confidence,
               "localised": h is not None and h.line + 1 in it["bug_lines"], "repaired": False}  # fmt: skip
        if h is not None and h.fix is not None and 0 <= h.line < len(it["lines"]):
            new = list(it["lines"])
            new[h.line] = h.fix
            to_run.append((row, it, "\n".join(new) + "\n"))
        rows.append(row)
    done = [r for r in rows if not r["skipped"]]
    return {**_score_quixbugs(ctx, root, rows, to_run), "hints_shown": sum(r["hint_line"] is not None for r in done),
            "min_confidence": runner.min_confidence}  # fmt: skip


def product_bugs(ctx: Context) -> dict:
    from assistant.tasks import TaskRequest

    runner: ProductRunner = ctx.extra["runner"]
    recs, where = _task_records(ctx, "debug", ctx.n("bugs"))
    preds = runner.run([TaskRequest("debug", r["code"], line=_def_line(r["code"].split("\n"))) for r in recs])
    pairs, fixed = [], 0
    for r, p in zip(recs, preds):
        if isinstance(p, BaseException):
            continue
        truth = parse_finding(r["answer"])
        h = _top_hint(p, runner.min_confidence)
        pred = None if h is None else Finding(h.line + 1, h.message, None if h.fix is None else h.fix.strip())
        pairs.append((None if truth is None else truth.line, pred))
        if (pred is not None and truth is not None and pred.line == truth.line and pred.fix is not None
                and truth.fix is not None and pred.fix == truth.fix.strip()):  # fmt: skip
            fixed += 1
    out = debug_scores(pairs)
    out["fix_exact"] = fixed / out["bugs"] if out["bugs"] else 0.0
    out.update({"n": len(pairs), "skipped": len(recs) - len(pairs), "source": where,
                "min_confidence": runner.min_confidence})  # fmt: skip
    return out


def docstring_text(literal: str) -> str:
    """The text inside a docstring literal, dedented."""
    import textwrap

    t = literal.strip()
    for q in ('"""', "'''"):
        if t.startswith(q) and t.endswith(q) and len(t) >= 6:
            t = t[3:-3]
            break
    first, _, rest = t.partition("\n")
    return (first.strip() + ("\n" + textwrap.dedent(rest) if rest else "")).strip()


def product_docstrings(ctx: Context) -> dict:
    from assistant.tasks import TaskRequest

    runner: ProductRunner = ctx.extra["runner"]
    recs, where = _task_records(ctx, "comment", ctx.n("docstrings"))
    preds = runner.run([TaskRequest("comment", r["code"], line=_def_line(r["code"].split("\n"))) for r in recs])
    texts = [None if isinstance(p, BaseException) or p is None else docstring_text(p.text) for p in preds]
    scores = [rouge_l(t, r["answer"]) for r, t in zip(recs, texts) if t is not None]
    n = len(scores)
    placeholders = sum(bool(re.search(r"\bTODO\b", t)) for t in texts if t is not None)
    out = {"rouge_l_f1": sum(scores) / n if n else 0.0, "with_todo": placeholders, "n": n,
           "skipped": len(recs) - n, "source": where}  # fmt: skip
    raw_pred = ctx.extra.get("raw_predictor")
    if raw_pred is not None:  # the model's own answer before the renderer
        raw = raw_pred.task("comment", [r["code"] for r in recs], ctx.max_new_tokens)
        rs = [rouge_l(p[1], r["answer"]) for r, p in zip(recs, raw) if p is not None]
        out["raw_rouge_l_f1"] = sum(rs) / len(rs) if rs else 0.0
    return out


# --------------------------------------------------------------------------- repository-level infilling


def repo_fim_items(roots: Sequence[str | Path], n: int, seed: int) -> list[dict]:
    """Single lines of held-out packages whose text uses a name that the file imports from
    another file of its package (where it is defined): ``n`` lines, spread over ``roots``."""
    from assistant.repo import RepoIndex

    rng = random.Random(seed)
    per_root: list[list[dict]] = []
    for root in roots:
        idx = RepoIndex(root)
        cands: list[dict] = []
        files = list(idx.files())
        rng.shuffle(files)
        for rel in files[:400]:
            text = idx._read(rel)
            if not text or len(text) > 200_000:
                continue
            imported = {imp.local: imp for imp in idx.imported_names(text, rel)}
            if not imported:
                continue
            import_rows = set(__import__("assistant.code", fromlist=["import_lines"]).import_lines(text))
            lines = text.split("\n")
            for i, ln in enumerate(lines[:-1]):
                s = ln.strip()
                if i in import_rows or not 4 <= len(s) <= 120 or s.startswith(("#", "@", "def ", "class ")):
                    continue
                names = set(re.findall(r"[A-Za-z_]\w*", s))
                hit = [nm for nm in names if nm in imported and (
                    imported[nm].attr is None or idx.definition(imported[nm].module_file, imported[nm].attr))]
                if hit:
                    cands.append({"root": str(root), "path": rel, "line": i, "names": sorted(hit)})
        rng.shuffle(cands)
        per_root.append(cands)
    items: list[dict] = []
    k = 0
    while len(items) < n and any(per_root):
        c = per_root[k % len(per_root)]
        if c:
            items.append(c.pop())
        k += 1
    return items


def suite_repo_fim(ctx: Context) -> dict:
    """Repository-level single-line infilling, through the product's completion path, scored
    with and without repository context (``TaskRequest.repo``)."""
    runner: ProductRunner | None = ctx.extra.get("runner")
    roots = ctx.extra.get("repos") or []
    if runner is None:
        raise EvalError("repo-fim runs on the product path (--path product)")
    if not roots:
        raise EvalError("repo-fim needs --repos DIR[,DIR...] (held-out packages)")
    items = repo_fim_items(roots, ctx.n("repo-fim"), ctx.seed)
    if not items:
        raise EvalError("repo-fim: no line in --repos uses a name imported from another file of its package")
    reqs: dict[str, list] = {"without": [], "with": []}
    refs = []
    for it in items:
        text = (Path(it["root"]) / it["path"]).read_text(encoding="utf-8")
        req, ref = completion_request(text.split("\n"), it["line"], path=str(Path(it["root"]) / it["path"]))
        refs.append(ref)
        reqs["without"].append(req)
        req2, _ = completion_request(text.split("\n"), it["line"], path=str(Path(it["root"]) / it["path"]))
        req2.repo, req2.recent = it["root"], []
        reqs["with"].append(req2)
    out: dict = {"n": len(items), "repos": [str(r) for r in roots]}
    preds: dict[str, list] = {}
    for key in ("without", "with"):
        preds[key] = runner.run(reqs[key])
        sc = [(r, _text(p)) for r, p in zip(refs, preds[key]) if _text(p) is not None]
        m = len(sc)
        out[f"exact_match_{key}"] = sum(exact_match(p, r) for r, p in sc) / m if m else 0.0
        out[f"edit_similarity_{key}"] = sum(edit_similarity(p, r) for r, p in sc) / m if m else 0.0
    out["gain_points"] = 100 * (out["exact_match_with"] - out["exact_match_without"])
    out["examples"] = [{"path": it["path"], "line": it["line"] + 1, "ref": r, "without": _text(a), "with": _text(b)}
                       for it, r, a, b in list(zip(items, refs, preds["without"], preds["with"]))[:20]]  # fmt: skip
    return out


PRODUCT_SUITE_FUNCS: dict[str, Callable[[Context], dict]] = {
    "fim": product_fim,
    "mbpp": product_mbpp,
    "mbpp-infill": product_mbpp_infill,
    "quixbugs": product_quixbugs,
    "bugs": product_bugs,
    "docstrings": product_docstrings,
    "repo-fim": suite_repo_fim,
}


SUITE_FUNCS: dict[str, Callable[[Context], dict]] = {
    "fim": suite_fim,
    "mbpp": suite_mbpp,
    "mbpp-infill": suite_mbpp_infill,
    "quixbugs": suite_quixbugs,
    "bugs": suite_bugs,
    "docstrings": suite_docstrings,
}

HEADLINE = {
    "bpb": ["bits_per_byte"],
    "fim": ["exact_match", "edit_similarity", "exact_match_spm", "edit_similarity_spm", "raw_exact_match_spm",
            "exact_match_repo_without", "exact_match_repo"],
    "mbpp": ["pass@1"],
    "mbpp-infill": ["exact_match", "pass", "exact_match_spm", "pass_spm"],
    "quixbugs": ["localisation_top1", "repair_pass", "hints_shown"],
    "bugs": ["precision", "recall", "false_alarm_rate", "fix_exact"],
    "docstrings": ["rouge_l_f1", "raw_rouge_l_f1", "with_todo"],
    "repo-fim": ["exact_match_without", "exact_match_with", "gain_points", "edit_similarity_without",
                 "edit_similarity_with"],
}


# --------------------------------------------------------------------------- CLI


class _Progress:
    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.counts: dict[str, int] = {}

    def __call__(self, suite: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < (0.5 if self.tty else 15.0):
            return
        self.last = now
        end = "\r" if self.tty and done < total else "\n"
        print(f"  {suite}: {done}/{total}", end=end, file=sys.stderr, flush=True)


def print_table(report: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"moecoder eval — {report.get('model', '')}")
    table.add_column("suite")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    table.add_column("seconds", justify="right")
    for suite, res in report["suites"].items():
        if "error" in res:
            table.add_row(suite, "error", res["error"], "", "")
            continue
        for k, metric in enumerate(m for m in HEADLINE.get(suite, []) if m in res):
            v = res.get(metric)
            text = f"{v:.4f}" if isinstance(v, float) else str(v)
            table.add_row(suite if k == 0 else "", metric, text, str(res.get("n", "")) if k == 0 else "",
                          f"{res.get('seconds', 0):.1f}" if k == 0 else "")  # fmt: skip
    Console(file=file or sys.stdout, width=110).print(table)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moecoder eval", description="Evaluate a model on held-out code and benchmarks."
    )
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument(
        "--suite", default=",".join(SUITES), help=f"comma-separated suites: {','.join(SUITES)} (default: all)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="items per suite (default: each suite's full size)"
    )
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report as JSON here")
    p.add_argument(
        "--data", default=None, help="corpus or packed directory whose test split is the held-out code"
    )
    p.add_argument("--task-data", default=None, help="task data directory (test.jsonl) for bugs/docstrings")
    p.add_argument("--eval-dir", default=None, help="external benchmarks (default: ../shared/eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--loop-guard", type=int, default=0, metavar="N",
                   help="the product's repetition guard on the prose tasks (comment/debug/explain: "
                        "model/repetition.py; 8 in the assistant); default 0: plain greedy")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sandboxed test run")
    p.add_argument(
        "--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel sandboxed test runs"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--path", choices=["product", "raw"], default="product",
                   help="product: every item through the assistant's task path (context manager, post-filters, "
                        "debug gate, docstring renderer) with the default settings, what a user gets; raw: "
                        "the model alone on hand-made prompts")  # fmt: skip
    p.add_argument("--repos", default=None, metavar="DIR[,DIR...]",
                   help="held-out project roots (e.g. packages in site-packages): the repo-fim suite's projects; "
                        "the fim suite also completes its lines in these with the project's memory")
    p.add_argument("--beams", type=int, default=None, metavar="N",
                   help="product path: beam width of single-line completions (default: the product's, 1 = greedy)")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="with --path product: the completion prompt cap (default: the settings' 512)")
    p.add_argument("--items", action="store_true",
                   help="with --path product and --json: each fim line's reference and completion(s) in the report")
    p.add_argument("--raw-beside", action="store_true",
                   help="with --path product: also the raw model's score where it explains one (fim, docstrings)")
    p.add_argument("--fim-order", choices=["psm", "spm", "both"], default="both",
                   help="FIM prompt order(s) for fim and mbpp-infill (PSM is what the assistant sends)")  # fmt: skip
    return p


def _versions() -> dict:
    out = {"python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch missing or broken CUDA: versions are informational
        pass
    return out


def run_suites(ctx: Context, suites: Sequence[str], model=None, progress_cb=None) -> dict:
    report: dict = {"suites": {}}
    for s in suites:
        t0 = time.monotonic()
        if ctx.predictor is not None and hasattr(ctx.predictor, "progress") and progress_cb is not None:
            total = {"fim": ctx.n("fim")}.get(s, ctx.n(s))
            state = {"done": 0}

            def tick(k, _s=s, _total=total, _state=state):
                _state["done"] += k
                progress_cb(_s, min(_state["done"], _total), _total)

            ctx.predictor.progress = tick
        runner = ctx.extra.get("runner")
        if runner is not None and progress_cb is not None:  # repo-fim, and fim with --repos: two passes
            total = ctx.n(s) * (2 if s == "repo-fim" or (s == "fim" and ctx.extra.get("repos")) else 1)
            state = {"done": 0}

            def rtick(k, _s=s, _total=total, _state=state):
                _state["done"] += k
                progress_cb(_s, min(_state["done"], _total), _total)

            runner.progress = rtick
        if s == "bpb":
            res = suite_bpb(ctx, model)
        elif runner is not None and s in PRODUCT_SUITE_FUNCS:
            res = PRODUCT_SUITE_FUNCS[s](ctx)
        else:
            res = SUITE_FUNCS[s](ctx)
        res["seconds"] = time.monotonic() - t0
        report["suites"][s] = res
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    if args.suite == ",".join(SUITES) and not args.repos:
        suites = [s for s in suites if s != "repo-fim"]  # the default run: repo-fim only with --repos
    bad = [s for s in suites if s not in SUITES]
    if bad or not suites:
        print(f"moecoder eval: error: unknown suite {', '.join(bad) or '(none)'} (choose from {', '.join(SUITES)})",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.limit is not None and args.limit < 1:
        print("moecoder eval: error: --limit must be positive", file=sys.stderr)
        return 2
    for name in ("data", "task_data", "eval_dir"):
        v = getattr(args, name)
        if v is not None and not Path(v).is_dir():
            print(f"moecoder eval: error: --{name.replace('_', '-')} {v} is not a directory", file=sys.stderr)
            return 2
    for suite in suites:  # before the model loads: the benchmarks are not part of an installed package
        if suite in EXTERNAL:
            path = _eval_dir(args.eval_dir).joinpath(*EXTERNAL[suite])
            if not path.is_file():
                print(f"moecoder eval: error: suite {suite}: {path} not found{_WHERE}", file=sys.stderr)
                return 2
    if args.json is not None and Path(args.json).is_dir():
        print(f"moecoder eval: error: --json {args.json} is a directory", file=sys.stderr)
        return 2
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        from model.checkpoint import load_model

        loaded = load_model(args.model, device=args.device)
    except ValueError as e:  # CheckpointError is a ValueError
        print(f"moecoder eval: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    progress = _Progress()
    predictor = ModelPredictor(loaded, batch_size=args.batch_size, loop_guard=args.loop_guard)
    ctx = Context(predictor=predictor, limit=args.limit, seed=args.seed, data=args.data, task_data=args.task_data,
                  eval_dir=Path(args.eval_dir) if args.eval_dir else None, tokenizer=loaded.tokenizer,
                  jobs=args.jobs, timeout=args.timeout, max_new_tokens=args.max_new_tokens, progress=progress,
                  extra={"ctx_len": int(loaded.config.max_seq_len),
                         "fim_orders": ("psm", "spm") if args.fim_order == "both" else (args.fim_order,)})  # fmt: skip
    if args.path == "product":
        from assistant.config import Settings
        from assistant.engine import Engine

        settings = Settings().for_face("review")
        if args.context_tokens is not None:
            if args.context_tokens < 16:
                print("moecoder eval: error: --context-tokens must be >= 16", file=sys.stderr)
                return 2
            settings.completion_context_tokens = args.context_tokens
        if args.beams is not None:
            if not 1 <= args.beams <= 16:
                print("moecoder eval: error: --beams must be from 1 to 16", file=sys.stderr)
                return 2
            settings.completion_beams = args.beams
        engine = Engine.from_loaded(loaded, **settings.engine_options())
        ctx.extra["runner"] = ProductRunner(engine, batch_size=args.batch_size,
                                            min_confidence=settings.review.min_confidence)
        if args.raw_beside:
            ctx.extra["raw_predictor"] = predictor
        ctx.extra["items"] = args.items
    if args.repos:
        repos = [r for r in args.repos.split(",") if r]
        missing = [r for r in repos if not Path(r).is_dir()]
        if missing:
            print(f"moecoder eval: error: --repos {missing[0]} is not a directory", file=sys.stderr)
            return 2
        ctx.extra["repos"] = repos
    t0 = time.monotonic()
    try:
        report = run_suites(ctx, suites, model=loaded.model, progress_cb=progress)
    except EvalError as e:
        print(f"moecoder eval: error: {e}", file=sys.stderr)
        return 2
    report.update({
        "model": str(args.model or "model/weights (shipped)"),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "device": args.device, "versions": _versions(), "seed": args.seed, "limit": args.limit, "path": args.path,
        "seconds": time.monotonic() - t0,
    })  # fmt: skip
    print_table(report)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
