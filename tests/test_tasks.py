"""assistant.tasks: prompts, post-filters, parsing, docstrings, calibration and the CLI."""

from __future__ import annotations

import json
import os

import pytest
from assistant_fakes import ScriptedBackend

from assistant import code as codemod
from assistant.engine import Engine
from assistant.tasks import (
    DebugResult,
    Docstring,
    TaskRequest,
    _open_brackets,
    calibrate,
    is_multiline,
    main,
    make_docstring,
    parse_debug_answer,
    parse_docstring_text,
    postprocess_completion,
    render_docstring,
)

SRC = '''import math


def area(r):
    """Area of a circle.

    Args:
        r: radius.

    Returns:
        the area.
    """
    return math.pi * r * r


def window(xs, n):
    out = []
    for i in range(len(xs) - n + 1):
        out.append(xs[i:i + n])
    return out


class Shape:
    def scale(self, k, *, strict=False):
        if k <= 0:
            raise ValueError("k must be positive")
        return k
'''


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    """Tests never read the developer's ~/.config/moecoder/config.toml."""
    monkeypatch.setenv("MOECODER_CONFIG", str(tmp_path / "no-config.toml"))


# -- completion ------------------------------------------------------------------------------
def test_multiline_decided_from_syntax():
    src = "def f(x):\n    \n    y = g(x, )\n    s = 'abc'\n    # note\n"
    assert not is_multiline(src, 1, 4)  # above a body that is there already: one line
    assert is_multiline("def f(x):\n    \n", 1, 4)  # the first line of a new body
    assert is_multiline("class A:\n    def f(self):\n        \n    def g(self):\n", 2, 8)  # an empty body
    gap = "def f(x):\n    a = 1\n    \n    b = 2\n"
    assert not is_multiline(gap, 2, 4)  # between two statements of one block: one line
    assert is_multiline(gap + "    \n", 4, 4)  # at the end of the block
    assert is_multiline("def f(x):\n    a = 1\n    \nz = 0\n", 2, 4)  # the block ends below
    assert not is_multiline("x = [\n    1,\n    \n]\n", 2, 4)  # inside open brackets
    assert is_multiline("def f(x):", 0, 9)  # right after a block header
    assert not is_multiline(src, 2, 8)  # code follows the cursor
    assert not is_multiline(src, 2, 14)  # mid-call: only closers follow, but brackets are open
    assert not is_multiline(src, 3, 11)  # inside a string
    assert not is_multiline(src, 4, 8)  # inside a comment
    assert not is_multiline("x = compute(", 0, 12)


def test_postfilter_stops_at_repeated_suffix():
    prefix = "def f(xs):\n    total = 0\n"
    suffix = "\n    return total\n"
    raw = "    for x in xs:\n        total += x\n    return total\n"
    assert postprocess_completion(raw, prefix, suffix, True) == "    for x in xs:\n        total += x"


def test_postfilter_repetition_guard():
    raw = "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\ny = 2\nx = 1\n"
    assert postprocess_completion(raw, "", "", True) == "x = 1\ny = 2"
    assert postprocess_completion("print('ha" + "ha" * 20, "", "", False).count("ha") < 5


def test_postfilter_balanced_brackets():
    # the suffix already closes the call: the completion must not close it again
    assert postprocess_completion("a, b)", "foo(", ")", False) == "a, b"
    # no closer in the suffix: the completion may close what the line opened
    assert postprocess_completion("a, b)", "foo(", "", False) == "a, b)"
    # a closer nothing opened is cut
    assert postprocess_completion("x + 1]) + 2", "y = ", "", False) == "x + 1"
    # a continuation line may close what an earlier line of the statement opened (a signature)
    sig = "class A:\n    def f(\n        self, x: int,\n    "
    assert postprocess_completion(") -> None:", sig, "", False) == ") -> None:"
    assert postprocess_completion(") -> None:", "x = 1\n", "", False) == ""  # nothing open: cut
    # ... also when the prompt's window starts inside an earlier call (a closer nothing in it opened)
    window = "        b=2,\n    )\n    return x\n\n" + sig
    assert postprocess_completion(") -> None:", window, "", False) == ") -> None:"
    assert _open_brackets("    ]\n    y = (1,\n") == ["("] and _open_brackets("def f(a, b):\n    x = {") == ["{"]
    assert _open_brackets('x = f(1, ")")\n') == []
    # multi-line: trailing lines that leave a bracket open are dropped
    raw = "    a = 1\n    b = foo(1,\n"
    assert postprocess_completion(raw, "def f():\n", "", True) == "    a = 1"


def test_postfilter_stays_in_block():
    prefix = "def f(xs):\n    for x in xs:\n        "
    raw = "print(x)\n        y = x\n    return xs\n\ndef g():\n    pass\n"
    assert postprocess_completion(raw, prefix, "", True) == "print(x)\n        y = x"


def test_postfilter_single_line_cuts_at_newline():
    assert postprocess_completion("x + 1\nmore()", "y = ", "", False) == "x + 1"


# -- debug answers and calibration ------------------------------------------------------------
def test_parse_debug_answer_defensive():
    assert parse_debug_answer("no issue") == (True, None, "", None)
    assert parse_debug_answer("line 3: wrong op\nfix: a - b") == (True, 3, "wrong op", "a - b")
    assert parse_debug_answer("well... line 7: off by one") == (True, 7, "off by one", None)
    assert parse_debug_answer("%%garbage%%")[0] is False
    assert parse_debug_answer("")[0] is False


def test_calibration_rewards_surprising_lines():
    lps = [-0.1, -0.2]
    assert calibrate(lps, 1.0) > calibrate(lps, 0.5) > calibrate(lps, 0.0)
    assert calibrate([-0.1], 1.0) > calibrate([-3.0], 1.0)
    assert 0.0 < calibrate([-50.0], 0.0) <= calibrate([0.0], 1.0) <= 0.99


def _engine(tok, answers, logprob=None):
    def script(task, code):
        return answers.get(task, ("", "no issue"))

    return Engine.from_loaded(backend=ScriptedBackend(tok, script, logprob=logprob))


def test_debug_maps_lines_and_keeps_indentation(tiny_tokenizer):
    eng = _engine(tiny_tokenizer, {"debug": ("Line 3 reads one past the end.",
                                             "line 3: off by one\nfix: for i in range(len(xs) - n):")})
    res = eng.run(TaskRequest("debug", SRC, path="w.py", function="window"))
    assert isinstance(res, DebugResult) and len(res.hints) == 1
    h = res.hints[0]
    assert (h.path, h.function, h.line) == ("w.py", "window", 17)  # 0-based file line of the for loop
    assert h.fix == "    for i in range(len(xs) - n):"
    assert h.reasoning == "Line 18 reads one past the end." and 0 < h.confidence < 1  # the file's numbering (model said 3)


def test_debug_surprising_line_gets_higher_confidence(tiny_tokenizer, monkeypatch):
    # the older confidence (answer probability x surprisal rank); the default is the gate
    # (tests/test_debug_calibration.py)
    import assistant.tasks

    monkeypatch.setattr(assistant.tasks, "DEBUG_USE_GATE", False)
    ans = {"debug": ("r", "line 3: suspicious\nfix: pass")}

    def lp_flat(piece):
        return -1.0

    def lp_peak(piece):  # the model is surprised by arithmetic (lines 3 and 4 of the function)
        return -6.0 if any(c in piece for c in "+-") else -1.0

    flat = _engine(tiny_tokenizer, ans, lp_flat).run(TaskRequest("debug", SRC, function="window")).hints[0]
    peak = _engine(tiny_tokenizer, ans, lp_peak).run(TaskRequest("debug", SRC, function="window")).hints[0]
    assert peak.confidence > flat.confidence


@pytest.mark.parametrize("answer", ["no issue", "no issue.", "£$% nonsense", "line 99: out of range", "line 2:"])
def test_debug_no_issue_and_garbage_give_no_hints(tiny_tokenizer, answer):
    eng = _engine(tiny_tokenizer, {"debug": ("thinking", answer)})
    res = eng.run(TaskRequest("debug", SRC, function="window"))
    assert res.hints == [] and res.reasoning == "thinking"


def test_debug_prompt_uses_the_model_format(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer)
    Engine.from_loaded(backend=backend).run(TaskRequest("debug", SRC, function="window"))
    prompt = backend.prompts[-1]
    assert prompt[0] == tiny_tokenizer.special_id("debug") and prompt[-1] == tiny_tokenizer.special_id("think")
    assert tiny_tokenizer.decode(prompt[1:-1]).startswith("1| def window(xs, n):\n2|     out = []")


# -- docstrings ------------------------------------------------------------------------------
ANSWERS = {
    "google": "Split xs into windows.\n\nArgs:\n    xs: the items.\n    n: window size.\n\nReturns:\n    the windows.",
    "numpy": "Split xs into windows.\n\nParameters\n----------\nxs : list\n    the items.\nn : int\n    window size.",
    "rest": "Split xs into windows.\n\n:param xs: the items.\n:param n: window size.\n:returns: the windows.",
    "plain": "Split xs into windows.",
}


@pytest.mark.parametrize("model_style", list(ANSWERS))
def test_parse_docstring_any_style(model_style):
    parts = parse_docstring_text(ANSWERS[model_style])
    assert parts.summary == "Split xs into windows."
    if model_style != "plain":
        assert parts.params["xs"].startswith("the items") and parts.params["n"].startswith("window size")


@pytest.mark.parametrize("style", ["google", "numpy", "rest", "plain"])
def test_render_in_file_style(style):
    func = codemod.find_function(SRC, "window")
    text = render_docstring(parse_docstring_text(ANSWERS["google"]), style, func, "    ")
    assert text.startswith('"""Split xs into windows.') and text.endswith('"""')
    body = text.split("\n")
    assert all(ln.startswith("    ") or not ln for ln in body[1:])
    if style == "google":
        assert "    Args:\n        xs: The items.\n        n: Window size." in text
        assert "    Returns:\n        The windows." in text
    elif style == "numpy":
        assert "    Parameters\n    ----------\n    xs\n        The items." in text
    elif style == "rest":
        assert "    :param xs: The items.\n    :param n: Window size.\n    :returns: The windows." in text
    else:
        assert text == '"""Split xs into windows."""'


def test_docstring_uses_real_signature_and_raises():
    func = codemod.find_function(SRC, "Shape.scale")
    doc = make_docstring(func, "Scale it.", "because", "google")
    # the model described nothing: no section is invented, no placeholder
    assert doc.text == '"""Scale it."""' and "TODO" not in doc.text
    doc = make_docstring(func, "Scale it.\n\nArgs:\n    k: the factor.\n\nReturns:\n    the scaled shape.", "", "google")
    assert "Args:\n            k: The factor." in doc.text and "strict" not in doc.text and "self" not in doc.text
    assert "Returns:\n            The scaled shape." in doc.text and "Raises:" not in doc.text
    doc = make_docstring(func, "Scale it.\n\nRaises:\n    ValueError: when k is negative.", "", "google")
    assert "Raises:\n            ValueError: When k is negative." in doc.text and "Args:" not in doc.text
    doc = make_docstring(func, "Scale it.", "because", "google")
    assert (doc.insert_line, doc.indent, doc.function, doc.replace_start) == (24, "        ", "Shape.scale", None)


def test_comment_task_end_to_end_in_file_style(tiny_tokenizer):
    eng = _engine(tiny_tokenizer, {"comment": ("It slides a window.", ANSWERS["rest"])})
    doc = eng.run(TaskRequest("comment", SRC, function="window"))
    assert isinstance(doc, Docstring) and doc.style == "google"  # SRC documents in Google style
    assert doc.text.startswith('"""Split xs into windows.') and "Args:" in doc.text
    assert doc.reasoning == "It slides a window." and doc.insert_line == 16
    existing = eng.run(TaskRequest("comment", SRC, function="area"))
    assert (existing.replace_start, existing.replace_end) == (4, 11)


def test_comment_prompt_leaves_out_the_existing_docstring(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer)
    Engine.from_loaded(backend=backend).run(TaskRequest("comment", SRC, function="area"))
    code = tiny_tokenizer.decode(backend.prompts[-1][1:-1])
    assert code == "def area(r):\n    return math.pi * r * r"


def test_complete_end_to_end_with_fim(tiny_tokenizer):
    src = SRC.replace("    return math.pi * r * r", "    return ")
    eng = _engine(tiny_tokenizer, {"complete": ("", "math.pi * r * r\nprint('more')")})
    res = eng.run(TaskRequest("complete", src, line=12, column=11))
    assert res.text == "math.pi * r * r" and res.multiline is False and res.reasoning == ""
    # text that only repeats what follows the cursor is dropped
    res = eng.run(TaskRequest("complete", SRC, line=12, column=11))
    assert res.text == ""


def test_tiny_model_all_tasks(tiny_model_dir):
    """Random weights write garbage: the mechanics still hold and nothing crashes."""
    eng = Engine(str(tiny_model_dir))
    for req in (TaskRequest("complete", SRC, line=17, column=4, max_new_tokens=8),
                TaskRequest("comment", SRC, function="window", max_new_tokens=12),
                TaskRequest("debug", SRC, function="Shape.scale", max_new_tokens=12),
                TaskRequest("explain", SRC, line=16, end_line=19, max_new_tokens=12)):
        kinds = [e.kind for e in eng.stream(req)]
        assert kinds[-1] == "done", (req.task, kinds)
    eng.close()


# -- CLI -------------------------------------------------------------------------------------
def test_cli_usage_errors(tmp_path, capsys):
    f = tmp_path / "a.py"
    f.write_text(SRC)
    assert main(["complete", f"{f}"]) == 2
    assert main(["complete", f"{f}:999:1"]) == 2
    assert main(["comment", str(f), "nope"]) == 2
    assert main(["debug", str(tmp_path / "missing.py")]) == 2
    (tmp_path / "bin.py").write_bytes(b"\x00\x01\x02")
    assert main(["debug", str(tmp_path / "bin.py")]) == 2
    (tmp_path / "latin.py").write_bytes(b"x = '\xe9'\n")
    assert main(["explain", f"{tmp_path / 'latin.py'}:1-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no such file" in err and "binary" in err and "UTF-8" in err
    # special files: one line, no hang, no unbounded read
    os.mkfifo(tmp_path / "fifo.py")
    (tmp_path / "zero.py").symlink_to("/dev/zero")
    assert main(["debug", str(tmp_path / "fifo.py")]) == 2
    assert main(["complete", f"{tmp_path / 'zero.py'}:1:1"]) == 2
    err = capsys.readouterr().err
    assert "fifo.py: not a regular file (a named pipe)" in err and "/dev/zero" in err and err.count("\n") == 2


def test_cli_runs_with_a_model(tmp_path, tiny_model_dir, capsys):
    f = tmp_path / "a.py"
    f.write_text(SRC)
    assert main(["debug", str(f), "window", "--model", str(tiny_model_dir), "--max-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, list) and set(out[0]) == {"hints", "reasoning"}
    assert main(["complete", f"{f}:18:5", "--model", str(tiny_model_dir), "--max-tokens", "4"]) == 0
    # repository context (stubs + the project's memory, assistant/memory.py); a missing DIR: exit 2
    capsys.readouterr()
    assert main(["complete", f"{f}:18:5", "--model", str(tiny_model_dir), "--max-tokens", "4",
                 "--repo", str(tmp_path), "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)[0]["text"] is not None and "for completion memory: file 1 of 1" in cap.err
    assert main(["complete", f"{f}:18:5", "--model", str(tiny_model_dir), "--repo", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["explain", f"{f}:17-20", "--model", str(tmp_path / "no-model")]) == 2


# -- settings --------------------------------------------------------------------------------
def test_settings_from_toml(tmp_path, monkeypatch):
    from assistant.config import ConfigError, load_settings

    cfg = tmp_path / "config.toml"
    cfg.write_text('model = "~/m"\nmax_seconds = 5\ncompletion_context_tokens = 300\ncompletion_beams = 2\n[max_tokens]\ndebug = 40\n[features]\nexplain = false\n'
                   '[review]\nmin_confidence = 0.4\njobs = 2\nfail_on = "error"\n')
    s = load_settings(cfg)
    assert s.model.endswith("/m") and not s.model.startswith("~") and s.max_seconds == 5.0
    assert s.completion_context_tokens == 300 and s.engine_options()["completion_beams"] == 2
    assert s.max_tokens["debug"] == 40 and s.max_tokens["complete"] == 64 and s.features["explain"] is False
    assert (s.review.min_confidence, s.review.jobs, s.review.fail_on) == (0.4, 2, "error")
    monkeypatch.setenv("MOECODER_CONFIG", str(cfg))
    assert load_settings().review.jobs == 2
    monkeypatch.setenv("MOECODER_CONFIG", str(tmp_path / "absent.toml"))
    assert load_settings().review.jobs == 4  # no file: defaults
    for bad, needle in [("jobs = 2\n", "unknown setting"), ("[review]\njobs = 0\n", "review.jobs"),
                        ("[max_tokens]\ndance = 3\n", "max_tokens.dance"), ("model = [\n", "invalid TOML"),
                        ("completion_beams = 0\n", "completion_beams")]:
        cfg.write_text(bad)
        with pytest.raises(ConfigError, match=needle) as info:
            load_settings(cfg)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "nope.toml")


def test_completion_prompt_is_capped_for_latency(tiny_tokenizer):
    backend = ScriptedBackend(tiny_tokenizer, context_length=4096)
    eng = Engine.from_loaded(backend=backend, completion_context_tokens=100)
    big = "\n".join(f"value_{i} = {i} * {i}" for i in range(2000))
    eng.run(TaskRequest("complete", big, line=1000, column=0))
    assert len(backend.prompts[-1]) <= 100


def test_single_line_completions_search_beams(tiny_tokenizer):
    from assistant.tasks import make_plan

    eng = Engine.from_loaded(backend=ScriptedBackend(tiny_tokenizer), completion_beams=3)
    src = "def f(x):\n    a = 1\n    \n    return a\n"
    assert make_plan(eng, TaskRequest("complete", src, line=2, column=4)).beams == 3  # one line
    assert make_plan(eng, TaskRequest("complete", "def f(x):\n    ", line=1, column=4)).beams == 1  # a body
    eng.completion_beams = 1
    assert make_plan(eng, TaskRequest("complete", src, line=2, column=4)).beams == 1


def test_beam_completions_are_reranked_by_the_code_after(tiny_tokenizer, tiny_model_dir, monkeypatch):
    """With beams, a single-line completion's plan carries a reranker that scores each finished
    line followed by the next lines, after the code before it (model.generate.continuation_logprobs);
    none for a multi-line completion, the file's first line, or COMPLETION_RERANK = 0. Through the
    engine on a real (tiny) model the reranker runs once per completion, on every finished beam."""
    from assistant import tasks
    from model import generate as gen
    from model.checkpoint import load_model

    eng = Engine.from_loaded(backend=ScriptedBackend(tiny_tokenizer), completion_beams=3)
    src = "def f(x):\n    a = 1\n    \n    return a\n"
    assert tasks.make_plan(eng, TaskRequest("complete", src, line=2, column=4)).rerank is not None
    assert tasks.make_plan(eng, TaskRequest("complete", "def f(x):\n    ", line=1, column=4)).rerank is None
    assert tasks.make_plan(eng, TaskRequest("complete", "x = ", line=0, column=4)).rerank is None
    monkeypatch.setattr(tasks, "COMPLETION_RERANK", 0.0)
    assert tasks.make_plan(eng, TaskRequest("complete", src, line=2, column=4)).rerank is None
    monkeypatch.setattr(tasks, "COMPLETION_RERANK", 0.1)

    calls = []
    real = gen.continuation_logprobs

    def spy(model, context, conts, mix=None):
        calls.append((tiny_tokenizer.decode(list(context)), [tiny_tokenizer.decode(list(c)) for c in conts]))
        return real(model, context, conts, mix=mix)

    monkeypatch.setattr(gen, "continuation_logprobs", spy)
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    real_eng = Engine.from_loaded(load_model(str(tiny_model_dir)), completion_beams=3)
    try:
        out = real_eng.run(TaskRequest("complete", src, line=2, column=4))
    finally:
        real_eng.close()
    assert len(calls) == 1
    context, conts = calls[0]
    assert context.endswith("    a = 1\n") and len(conts) >= 2
    assert all(c.startswith("    ") and c.endswith("\n    return a\n") for c in conts)
    assert any(c == "    " + out.text + "\n    return a\n" for c in conts)  # the pick is one of them

    # lines longer than the model's context after the code before them: cut, still a completion
    calls.clear()
    long_src = "def f(x):\n    a = 1\n    \n    return a + " + " + ".join(["x"] * 400) + "\n"
    real_eng = Engine.from_loaded(load_model(str(tiny_model_dir)), completion_beams=3)
    try:
        out = real_eng.run(TaskRequest("complete", long_src, line=2, column=4))
    finally:
        real_eng.close()
    assert len(calls) == 1 and isinstance(out.text, str)
    assert any(c.endswith("x + x") and "return a" in c for c in calls[0][1])  # the after part, cut


def test_debug_consistency_checks(tiny_tokenizer):
    # the hint quotes code that is on the next line: the hint moves there
    eng = _engine(tiny_tokenizer, {"debug": ("r", "line 2: `range(len(xs) - n + 1)` is off by one\n"
                                                  "fix: for i in range(len(xs) - n):")})
    h = eng.run(TaskRequest("debug", SRC, function="window")).hints[0]
    assert h.line == 17 and h.fix == "    for i in range(len(xs) - n):"
    # a "fix" that is not a small edit of the line is not offered
    eng = _engine(tiny_tokenizer, {"debug": ("r", "line 3: wrong\nfix: return something_else_entirely()")})
    assert eng.run(TaskRequest("debug", SRC, function="window")).hints[0].fix is None
    # quoted code that is nowhere near lowers the confidence
    plain = _engine(tiny_tokenizer, {"debug": ("r", "line 3: off by one")})
    stray = _engine(tiny_tokenizer, {"debug": ("r", "line 3: `zzz` off by one")})
    c_plain = plain.run(TaskRequest("debug", SRC, function="window")).hints[0].confidence
    c_stray = stray.run(TaskRequest("debug", SRC, function="window")).hints[0].confidence
    assert c_stray < c_plain


# -- rough edges of the task commands (#20) ------------------------------------------------------
def test_cli_errors_say_what_is_wrong(tmp_path, capsys):
    f = tmp_path / "a.py"
    f.write_text(SRC)
    assert main(["complete", f"{f}:5:999"]) == 2
    assert main(["complete", f"{f}:999:1"]) == 2
    assert main(["explain", f"{f}:10-4"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3
    assert "column 999 is outside line 5 (columns 1..25)" in err[0]  # line 5: `    """Area of a circle.`
    assert "line 999 is outside the file" in err[1]
    assert "the range is reversed (start 10 > end 4); write 4-10" in err[2]
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n    return 1\n")
    assert main(["debug", str(broken)]) == 2
    assert main(["comment", str(broken), "f"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all("broken.py: does not parse: " in e and "(line 1)" in e for e in err), err


def test_cli_debug_uses_the_reviews_threshold_and_says_what_it_hides(tmp_path, capsys, monkeypatch,
                                                                      tiny_tokenizer):
    from assistant import engine as engine_mod

    f = tmp_path / "a.py"
    f.write_text(SRC)
    monkeypatch.setenv("MOECODER_CONFIG", str(tmp_path / "none.toml"))
    answers = {"debug": ("Line 3 reads one past the end.", "line 3: off by one\nfix: for i in range(len(xs) - n):")}
    made = []

    def fake(settings, model=None):
        made.append(_engine(tiny_tokenizer, answers))
        return made[-1]

    monkeypatch.setattr(engine_mod.Engine, "from_settings", staticmethod(fake))
    monkeypatch.setattr("assistant.tasks.DEBUG_USE_GATE", False)
    monkeypatch.setattr("assistant.tasks.calibrate", lambda lps, rank: 0.3)  # below the review's 0.5
    assert main(["debug", str(f), "window", "--no-reasoning"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no issue (1 hint below confidence 0.50 hidden, as in the review;"), out
    assert main(["debug", str(f), "window", "--min-confidence", "0"]) == 0
    out = capsys.readouterr().out
    # reasoning and finding count lines the same way: the file's
    assert "Line 18 reads one past the end." in out and f"{f}:18: off by one (confidence 0.30)" in out
    assert main(["debug", str(f), "window", "--min-confidence", "2"]) == 2
    assert "--min-confidence must be between 0 and 1" in capsys.readouterr().err


def test_a_file_of_many_functions_is_planned_a_window_at_a_time(tiny_tokenizer, monkeypatch):
    """The review's memory is bounded by the work in flight, not by the file's size: a plan holds
    its file's lines, and plans are made a window at a time as results go out (all up front took
    3.5 GB on a 20k-line file: docs/benchmarks.md)."""
    import assistant.tasks as T

    src = "\n\n".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(120))
    reqs = [TaskRequest("debug", src, function=f"f{i}", max_new_tokens=4) for i in range(120)]
    eng = Engine.from_loaded(backend=ScriptedBackend(tiny_tokenizer, context_length=4096))
    made = [0]
    real = T.make_plan

    def counting(engine, req):
        made[0] += 1
        return real(engine, req)

    monkeypatch.setattr(T, "make_plan", counting)

    def most_ahead(**kw) -> int:
        made[0], done, ahead = 0, 0, 0
        for _ in T.iter_batch(eng, reqs, batch_size=4, **kw):
            done += 1
            ahead = max(ahead, made[0] - done)
        assert done == len(reqs)
        return ahead

    try:
        assert most_ahead() <= 32 + 4  # the default window (32 for batches of 4) + one batch
        assert most_ahead(window=len(reqs)) > 100  # the measure sees planning all up front
    finally:
        eng.close()
