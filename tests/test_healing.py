"""Token healing: a completion at the end of a typed word continues the word."""

from __future__ import annotations

from model.generate import SamplingParams, generate


def test_healed_generation_spells_the_typed_word_first(tiny_model_dir):
    from model.checkpoint import load_model

    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    for word in ("whi", "sp", "retur"):
        out = generate(loaded.model, tok, tok.encode("def f(x):\n    "), SamplingParams(max_new_tokens=8, heal=word))
        assert out.text.startswith(word), (word, out.text)
    plain = generate(loaded.model, tok, tok.encode("def f(x):\n    "), SamplingParams(max_new_tokens=8))
    assert not plain.text.startswith("retur")  # the random model would not have: the constraint did it


def _complete(tok, src: str, line: int, column: int, model_writes: str) -> tuple[str, str]:
    """(the completion prompt, decoded; the completion) with a scripted model writing ``model_writes``."""
    from assistant_fakes import ScriptedBackend

    from assistant.engine import Engine
    from assistant.tasks import TaskRequest

    backend = ScriptedBackend(tok, lambda task, code: ("", model_writes))
    eng = Engine.from_loaded(backend=backend)
    try:
        res = eng.run(TaskRequest("complete", src, "a.py", line, column))
        return tok.decode(backend.prompts[-1]), res.text
    finally:
        eng.close()


def test_completion_prompt_stops_at_the_word_start_and_the_answer_drops_the_typed_part(tiny_tokenizer):
    from assistant.tasks import healing_word

    assert healing_word("    x = text.sp", 15) == "sp" and healing_word("wo rd", 1) == ""
    prompt, text = _complete(tiny_tokenizer, "def f(text):\n    return text.sp\n", 1, 18, "split()")
    assert "text." in prompt and "text.sp" not in prompt  # the typed "sp" is left to the model
    assert text == "lit()"  # "split()" minus the "sp" already in the buffer


def test_completion_after_the_indentation_starts_the_prompt_at_the_line_start(tiny_tokenizer):
    """An editor's cursor sits after the indentation; the model's middles begin at a line start.
    The prompt stops at the line start and the typed indentation is dropped from the answer."""
    from assistant.tasks import healing_text

    assert healing_text("        ", 8) == "        " and healing_text("    x = a.b", 11) == "b"
    assert healing_text("    x", 2) == "  " and healing_text("", 0) == ""
    prompt, text = _complete(tiny_tokenizer, "def f(x):\n    \n", 1, 4, "    return x")
    assert "def f(x):\n" in prompt and "    " not in prompt  # the indentation is the model's to write
    assert text == "return x"  # the typed indentation is not inserted twice


def test_healed_indentation_on_the_tiny_model_is_spelled_first(tiny_model_dir):
    from model.checkpoint import load_model

    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    for prompt in ("def f(x):\n", "class A:\n    def f(self):\n", "if x:\n"):
        out = generate(loaded.model, tok, tok.encode(prompt), SamplingParams(max_new_tokens=8, heal="        "))
        assert out.text.startswith("        "), repr(out.text)
        assert out.text[8:9] not in (" ", "\t"), repr(out.text)  # the code starts at the cursor's indentation


def test_healed_indentation_allows_no_more_blanks_and_word_healing_still_extends(tiny_tokenizer):
    from model.generate import Healer

    tok = tiny_tokenizer
    vocab = int(tok.vocab_size)
    h = Healer(tok, "    ", vocab)
    first = h.allowed([], "cpu")
    assert first is not None
    for i in first.nonzero().flatten().tolist():  # each allowed piece spells part of the indentation, or all of it and then code
        p = h.pieces[i]
        assert b"    ".startswith(p) or (p.startswith(b"    ") and p[4:5] not in (b" ", b"\t")), p
    spaces = tok.encode("    ")
    after = h.allowed(spaces, "cpu")  # the indentation is spelled: the next piece must not start with a blank
    assert after is not None and after.any()
    blank = [i for i, p in enumerate(h.pieces) if p[:1] in (b" ", b"\t")]
    assert blank and not after[blank].any()
    assert h.allowed(spaces + tok.encode("x"), "cpu") is None  # then the model is free
    w = Healer(tok, "r", vocab)  # a word: every piece that spells it and goes on is fine
    ok = w.allowed([], "cpu")
    longer = [i for i, p in enumerate(w.pieces) if p.startswith(b"r") and len(p) > 1]
    assert longer and ok[longer].all()
    assert w.allowed(tok.encode("r"), "cpu") is None
