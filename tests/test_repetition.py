"""model.repetition: the loop guard, and generation that stops at the FIM suffix."""

from __future__ import annotations

import dataclasses

import pytest

from model.formats import fim_suffix_stop
from model.generate import SamplingParams, generate
from model.repetition import LoopGuard


class _Tok:
    PIECES = {1: " pref", 2: "ixed", 3: "    ", 4: "x", 5: "-", 6: "(", 7: " the"}

    def decode(self, ids):
        return "".join(self.PIECES.get(i, "?") for i in ids)


def test_the_third_copy_of_a_unit_is_banned():
    g = LoopGuard(_Tok())
    assert g.banned([1, 2, 1, 2, 1]) == [2]  # " prefixed prefixed pref" -> not "ixed" again
    assert g.banned([1, 2, 1, 2]) == []  # two copies are fine
    assert g.banned([7, 7]) == [7]  # " the the" -> not " the" a third time
    assert g.banned([3, 3]) == [] and g.banned([5, 5]) == [] and g.banned([6, 6]) == []  # no letters: allowed
    assert g.banned([4, 1, 2]) == []


def test_fim_suffix_stop_is_the_first_real_suffix_line():
    assert fim_suffix_stop("\n\n\ndef mul(a, b):\n    return a * b\n") == "\ndef mul(a, b):"
    assert fim_suffix_stop(")\n    return x\n") == "\n    return x"
    assert fim_suffix_stop(")\n\n") is None  # nothing to recognise the suffix by


@pytest.fixture
def looping_model(tiny_model_dir):
    """The tiny model, its output layer rigged so that greedy decoding repeats one token forever."""
    from model.checkpoint import load_model

    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    word = tok.encode(" prefixed")[0]
    orig = loaded.model.forward

    def prefers_one_word(*args, **kwargs):
        logits = orig(*args, **kwargs).clone()
        logits[..., word] += 100.0  # every position prefers the same word
        return logits

    loaded.model.forward = prefers_one_word
    return loaded, word


def test_greedy_generation_does_not_loop_with_the_guard(looping_model):
    loaded, word = looping_model
    tok = loaded.tokenizer
    params = SamplingParams(max_new_tokens=12)
    plain = generate(loaded.model, tok, tok.encode("def f():"), params)
    assert plain.token_ids.count(word) == 12  # the loop, as the issue saw it
    guarded = generate(loaded.model, tok, tok.encode("def f():"), dataclasses.replace(params, loop_guard=8))
    ids = guarded.token_ids
    assert not any(ids[k] == ids[k + 1] == ids[k + 2] == word for k in range(len(ids) - 2)), ids


SRC = "def scale(xs, k):\n    out = []\n    for x in xs:\n        out.append(x * k)\n    return out\n"


@pytest.mark.parametrize("task", ["comment", "explain", "debug"])
def test_task_commands_do_not_loop(looping_model, task):
    """comment, explain and debug (and the chat, which runs them) decode with the guard: the
    model that says " prefixed" forever does not get to say it three times in a row."""
    from assistant.engine import Engine
    from assistant.tasks import TaskRequest

    loaded, word = looping_model
    unit = loaded.tokenizer.decode([word])  # " prefixed", or its first piece on a small vocabulary
    eng = Engine.from_loaded(loaded)
    try:
        req = TaskRequest(task, SRC, function="scale", max_new_tokens=12, min_confidence=None)
        text = "".join(ev.text or "" for ev in eng.stream(req) if ev.kind in ("reasoning", "answer"))
    finally:
        eng.close()
    assert unit in text, text  # the rigged model did run
    assert unit * 3 not in text, text


def _scripted(loaded, tok, text: str):
    """Rig the model so that greedy decoding writes ``text`` (then end-of-text)."""
    script = [*tok.encode(text), tok.eos_id]
    orig = loaded.model.forward
    calls = []

    def forward(*args, **kwargs):
        logits = orig(*args, **kwargs).clone()
        step = min(len(calls), len(script) - 1)
        calls.append(step)
        logits[..., script[step]] += 1000.0
        return logits

    loaded.model.forward = forward
    return loaded


def test_generate_cli_fim_stops_where_the_suffix_begins(tiny_model_dir, monkeypatch, capsys):
    """`moecoder generate --fim-suffix`: the middle ends where the suffix's first line would be
    written again (the issue: it went on past the middle)."""
    import model.checkpoint
    from model.generate import main

    real = model.checkpoint.load_model

    def load(path, **kw):
        loaded = real(path, **kw)
        return _scripted(loaded, loaded.tokenizer, "x + 1\n    return y\n\n\ndef g():\n    pass\n")

    monkeypatch.setattr(model.checkpoint, "load_model", load)
    assert main(["--model", str(tiny_model_dir), "--prompt", "def f(x):\n    y = ", "--fim-suffix",
                 "\n    return y\n", "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n") == "x + 1", repr(out)


def test_generate_cli_guards_greedy_loops_by_default(looping_model, tiny_model_dir, monkeypatch, capsys):
    import model.checkpoint
    from model.generate import main

    loaded, word = looping_model
    unit = loaded.tokenizer.decode([word])
    monkeypatch.setattr(model.checkpoint, "load_model", lambda path, **kw: loaded)
    argv = ["--model", str(tiny_model_dir), "--prompt", "def f():", "--max-new-tokens", "12"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert unit in out and unit * 3 not in out, out
    assert main([*argv, "--loop-guard", "0"]) == 0  # off: the loop the issue saw
    assert unit * 3 in capsys.readouterr().out
