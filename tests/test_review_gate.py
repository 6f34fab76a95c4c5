"""The review's pre-gate: a function whose debug gate alone keeps every hint below the
threshold is settled by one forward pass, without generation, and the report is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from assistant_fakes import ScriptedBackend

from assistant import tasks
from assistant.engine import Engine
from assistant.review import Options, Report, run_review

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "buggy"
PLANTED = {  # marker in the code -> (hint, fix)
    "range(len(values) + 1)": ("off-by-one: reads past the end", "for i in range(len(values)):"),
    "items[mid] > target": ("wrong comparison", "if items[mid] < target:"),
    "len(sentence)": ("variable misuse: should be the word", "lengths[word] = len(word)"),
}


def script(task, code):
    if task == "debug":  # like the shipped model: a "line N" answer for every function
        for line in code.split("\n"):
            for marker, (hint, fix) in PLANTED.items():
                if marker in line:
                    n = int(line.split("|", 1)[0])
                    return f"Line {n} looks wrong: {hint}.", f"line {n}: {hint}\nfix: {fix}"
        return "Line 1 might be wrong.", "line 1: `zzz_unknown` looks odd"
    if task == "comment":
        return "It computes something.", "Compute something.\n\nArgs:\n    x: a value."
    return "", ""


class GateBackend(ScriptedBackend):
    """Gate score 3.0 (confidence 0.88) on the planted bugs, 0.0 (0.26) elsewhere."""

    def __init__(self, tok):
        super().__init__(tok, script, context_length=4096)
        self.gate_calls = 0

    def next_token_logprobs(self, ids, candidates):
        self.gate_calls += 1
        prompt = self.tokenizer.decode(list(ids))
        return [0.0, -3.0] if any(m in prompt for m in PLANTED) else [-1.0, -1.0]


def _review(tok, **opts):
    backend = GateBackend(tok)
    report = run_review([str(EXAMPLES)], Options(**opts), Engine.from_loaded(backend=backend), Report())
    return report, backend


def _strip(report):
    return [(f.path, f.line, f.rule, f.confidence, f.message, f.fix, f.reasoning) for f in report.findings]


def test_pregate_skips_generation_and_keeps_the_report(tiny_tokenizer):
    gated, b1 = _review(tiny_tokenizer)
    full, b2 = _review(tiny_tokenizer, gate=False)
    assert _strip(gated) == _strip(full)
    assert {f.function for f in gated.findings if f.rule == "MC001"} == {"mean", "binary_search", "word_lengths"}
    assert gated.functions_reviewed == full.functions_reviewed == 9 and not gated.skipped
    # generated: 3 planted bugs + 3 docstrings instead of 9 debug + 3 docstrings
    assert len(b1.prompts) == 6 and len(b2.prompts) == 12
    # one gate forward per function: the pre-gate's score is reused by the finding
    assert b1.gate_calls == 9


def test_pregate_follows_the_threshold(tiny_tokenizer):
    low, b = _review(tiny_tokenizer, min_confidence=0.2)  # every gate (0.26, 0.88) can clear 0.2
    assert len(b.prompts) == 12
    # the odd "line 1" answers: 0.26 x 0.5 (the quote is not on the line) = 0.13 < 0.2
    assert {f.function for f in low.findings if f.rule == "MC001"} == {"mean", "binary_search", "word_lengths"}
    none, b = _review(tiny_tokenizer, min_confidence=0.0)
    assert len(b.prompts) == 12 and sum(f.rule == "MC001" for f in none.findings) == 9
    high, b = _review(tiny_tokenizer, min_confidence=0.9)  # above every gate: only the docstrings
    assert len(b.prompts) == 3 and {f.rule for f in high.findings} == {"MC002"}


def test_confidence_bound_covers_the_rank_term(monkeypatch):
    assert tasks.debug_confidence_bound(1.05) == 0.5
    monkeypatch.setattr(tasks, "DEBUG_RANK_WEIGHT", 2.0)
    assert tasks.debug_confidence_bound(1.05) == tasks.gate_confidence(1.05, rank=1.0) > 0.5
    assert all(tasks.gate_confidence(0.3, rank=r) <= tasks.debug_confidence_bound(0.3) for r in (0.0, 0.5, 1.0))


def test_skip_init_leaves_tensors_and_restores_torch_init():
    from model.checkpoint import skip_init

    normal = torch.nn.init.normal_
    t = torch.zeros(3)
    with skip_init():
        assert torch.nn.init.normal_(t, std=1.0) is t and not t.any()
        torch.nn.Linear(4, 4)  # builds without touching the random generator
    assert torch.nn.init.normal_ is normal
    with pytest.raises(RuntimeError), skip_init():
        raise RuntimeError
    assert torch.nn.init.normal_ is normal
