"""The debug task's calibrated decision: the first-reasoning-token gate and its threshold."""

from __future__ import annotations

import math

import pytest
from assistant_fakes import ScriptedBackend

from assistant import tasks
from assistant.engine import Engine
from assistant.tasks import TaskRequest, debug_gate_score, gate_confidence
from tests.scripts import load_script

SRC = """def total(xs):
    s = 0
    for x in xs:
        s += x
    return s
"""


def _gate_engine(tok, bug_lp: float, clean_lp: float, answer: str = "line 4: `+=` should be `-=`\nfix: s -= x"):
    """A scripted model that answers ``answer`` and puts log-probability ``bug_lp`` on the
    first token of "Line" and ``clean_lp`` on the first token of "Takes" after the prompt."""
    bug_piece = tok.decode([tok.encode(tasks.DEBUG_BUG_START)[0]])
    clean_piece = tok.decode([tok.encode(tasks.DEBUG_CLEAN_START)[0]])

    def lp(piece: str) -> float:
        return {bug_piece: bug_lp, clean_piece: clean_lp}.get(piece, -1.0)

    backend = ScriptedBackend(tok, lambda task, code: ("Line 4 adds.", answer), logprob=lp)
    return Engine.from_loaded(backend=backend)


def test_gate_confidence_is_one_half_at_the_threshold_and_monotone():
    t = tasks.DEBUG_GATE_THRESHOLD
    assert gate_confidence(t) == 0.5
    assert gate_confidence(t - 3) < gate_confidence(t - 1) < 0.5 < gate_confidence(t + 1) < gate_confidence(t + 3)
    assert 0.01 <= gate_confidence(-1e9) and gate_confidence(1e9) <= 0.99


def test_gate_score_is_the_log_ratio_of_the_two_first_tokens(tiny_tokenizer):
    eng = _gate_engine(tiny_tokenizer, bug_lp=-0.5, clean_lp=-4.0)
    prompt = tasks.make_plan(eng, TaskRequest("debug", SRC, line=0)).prompt_ids
    assert debug_gate_score(eng, prompt) == pytest.approx(3.5)


def test_model_that_prefers_the_clean_path_gets_its_hint_dropped(tiny_tokenizer):
    """The sampled answer says "line 4" either way; the gate decides the confidence."""
    t = tasks.DEBUG_GATE_THRESHOLD
    buggy = _gate_engine(tiny_tokenizer, bug_lp=-0.1, clean_lp=-0.1 - (t + 3)).run(TaskRequest("debug", SRC, line=0))
    clean = _gate_engine(tiny_tokenizer, bug_lp=-0.1 - 3, clean_lp=-0.1).run(TaskRequest("debug", SRC, line=0))
    assert len(buggy.hints) == 1 and len(clean.hints) == 1
    assert buggy.hints[0].line == 3 and buggy.hints[0].fix == "        s -= x"
    assert buggy.hints[0].confidence > 0.9
    assert clean.hints[0].confidence < 0.05


def test_no_issue_answer_gives_no_hint_whatever_the_gate(tiny_tokenizer):
    res = _gate_engine(tiny_tokenizer, bug_lp=-0.1, clean_lp=-9.0, answer="no issue").run(
        TaskRequest("debug", SRC, line=0))
    assert res.hints == []


def test_real_model_forward_matches_teacher_forcing(tiny_model_dir):
    """The one-forward path (real model, last position only) equals the two teacher-forced
    log-probabilities."""
    eng = Engine(str(tiny_model_dir))
    try:
        prompt = tasks.make_plan(eng, TaskRequest("debug", SRC, line=0)).prompt_ids
        fast = eng.submit(lambda: debug_gate_score(eng, prompt))
        tok = eng.tokenizer
        a = eng.backend.token_logprobs([*prompt, tok.encode(tasks.DEBUG_BUG_START)[0]])[-1]
        b = eng.backend.token_logprobs([*prompt, tok.encode(tasks.DEBUG_CLEAN_START)[0]])[-1]
        assert fast is not None and math.isfinite(fast)
        assert fast == pytest.approx(a - b, abs=1e-3)
    finally:
        eng.close()


def _script():
    return load_script("calibrate_debug")


def test_threshold_is_chosen_on_calibration_packages_only():
    cal = _script()

    def rec(pkg, gate, bug):
        return {"package": pkg, "gate": gate, "bug_line": 2 if bug else None, "hint_line": 2, "factor": 1.0,
                "rank": 0.5, "legacy": 0.6}

    calib = [rec("a", g, False) for g in range(10)] + [rec("a", 20.0, True)] * 5
    test = [rec("b", 100.0, False)] * 3 + [rec("b", -100.0, True)] * 3  # would move any threshold
    t = cal.choose_threshold(calib, 0.1, True)
    assert 8.0 < t <= 9.0  # flags exactly 1 of the 10 clean calibration functions
    out = cal.report(calib + test, 0.1, {"a"})
    v = out["variants"]["gate x factors"]
    assert v["threshold"] == t
    assert v["calib"]["false_alarms"] == pytest.approx(0.1) and v["calib"]["localised"] == 1.0
    assert v["test"]["false_alarms"] == 1.0 and v["test"]["recall"] == 0.0
    assert cal.unnumber("1| def f():\n2|     return 1") == "def f():\n    return 1"
