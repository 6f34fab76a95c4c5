"""model.repetition: the loop guard, and generation that stops at the FIM suffix."""

from __future__ import annotations

import dataclasses

import pytest

from model.formats import FimEnd, fim_suffix_stop
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
        return _scripted(loaded, loaded.tokenizer, script.pop(0))

    monkeypatch.setattr(model.checkpoint, "load_model", load)
    script = ["    y = x + 1\n    return y\n\n\ndef g():\n    pass\n",
              "1\n    if a == 0:\n        return a\n    if a == 1:\n        return a\n"]
    assert main(["--model", str(tiny_model_dir), "--prompt", "def f(x):\n", "--fim-suffix",
                 "\n    return y\n", "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == "    y = x + 1"  # the model wrote the suffix's line: cut there
    # the cursor inside a line whose rest is empty: the middle is the rest of the line, though the
    # model goes on (the issue's `moecoder generate --fim-suffix` ran to --max-new-tokens)
    assert main(["--model", str(tiny_model_dir), "--prompt", "def add(a, b):\n    total = ", "--fim-suffix",
                 "\n    return total\n", "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == "1"


def _pieces(prefix: str, suffix: str, middle: str, step: int) -> tuple[str, bool]:
    end, out = FimEnd(prefix, suffix), ""
    for i in range(0, len(middle), step):
        text, done = end.push(middle[i:i + step])
        out += text
        if done:
            return out, True
    return out + end.flush(), False


@pytest.mark.parametrize("prefix, suffix, middle, shown, ended", [
    ("def add(a, b):\n    total = ", "\n    return total\n", "1\n    if a == 0:\n        return a\n", "1", True),
    ("x = foo(", "\n", "a,\n    b)\ny = 2\n", "a,\n    b)", True),  # brackets left open on the line
    ("x = foo(", ")\n", "a, b\nzzz", "a, b", True),  # the suffix closes them
    ("s = ", "\n", '"""a\nb"""\nnext = 1\n', '"""a\nb"""', True),  # a newline inside a string
    ("y = a + \\", "\n", "\n    b\nz = 1", "\n    b", True),  # a backslash continuation
    ("x = 1  # the ", "\n", "value (a\nnext line", "value (a", True),  # a comment's brackets
    ("def f(x):\n    ", "\n\ndef g():\n    pass\n", "return x + 1\n\n\ndef h():\n    pass\n", "return x + 1",
     True),  # a new statement: ends where the block does
    ("def f(x):\n    ", "\n", "if x:\n        return 1\n    return 2\nprint(3)\n",
     "if x:\n        return 1\n    return 2", True),
    ("if x:", "\n    pass\n", "\n    y = 1\n", "\n    y = 1\n", False),  # a block header: eos or suffix only
    ("x = [\n    ", "\n]\n", "1,\n    2,\n]\nfoo()", "1,\n    2,\n]\nfoo()", False),  # inside brackets
])
def test_fim_end_finds_the_end_of_the_middle(prefix, suffix, middle, shown, ended):
    for step in (1, 3, len(middle)):  # token pieces of any size, a `"""` split across them too
        assert _pieces(prefix, suffix, middle, step) == (shown, ended), step


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


def test_a_block_of_lines_twice_in_a_row_is_a_repeat():
    block = "def g(x):\n    return x + 1\n\n"
    assert LoopGuard.repeated_block("import os\n" + block + block)
    assert LoopGuard.repeated_block("import os\n" + block + block + "def")  # judged on complete lines
    assert not LoopGuard.repeated_block("import os\n" + block)
    assert not LoopGuard.repeated_block("    x += 1\n    x += 1\n")  # one line twice: code does that
    assert not LoopGuard.repeated_block("a\nb\na\nb\n")  # too short to call a loop
    assert not LoopGuard.repeated_block("----\n====\n----\n====\n" * 2)  # no letters or digits
    assert not LoopGuard.repeated_block(block + "def h(x):\n    return x + 1\n\n")


def test_greedy_generation_stops_when_a_block_of_lines_repeats(tiny_model_dir):
    """A model that writes the same function again and again (a unit of dozens of tokens, beyond the
    token ban) stops after the second copy with finish_reason "repeat"; without the guard it runs on."""
    from model.checkpoint import load_model

    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    block = "def g(x):\n    return x + 1\n"
    cycle = tok.encode(block)
    orig = loaded.model.forward
    calls = [0]

    def writes_the_block_forever(*args, **kwargs):
        logits = orig(*args, **kwargs).clone()
        logits[..., cycle[calls[0] % len(cycle)]] += 1000.0
        calls[0] += 1
        return logits

    loaded.model.forward = writes_the_block_forever
    n = 4 * len(cycle)
    plain = generate(loaded.model, tok, tok.encode("import os\n"), SamplingParams(max_new_tokens=n))
    assert plain.text.count(block) >= 3 and plain.finish_reason == "length"
    calls[0] = 0
    guarded = generate(loaded.model, tok, tok.encode("import os\n"), SamplingParams(max_new_tokens=n, loop_guard=8))
    assert guarded.finish_reason == "repeat" and guarded.text == block * 2, guarded.text
