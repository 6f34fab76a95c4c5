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


def test_completion_prompt_stops_at_the_word_start_and_the_answer_drops_the_typed_part(tiny_tokenizer):
    from assistant_fakes import ScriptedBackend

    from assistant.engine import Engine
    from assistant.tasks import TaskRequest, healing_word

    assert healing_word("    x = text.sp", 15) == "sp" and healing_word("wo rd", 1) == ""
    src = "def f(text):\n    return text.sp\n"
    backend = ScriptedBackend(tiny_tokenizer, lambda task, code: ("", "split()"))
    eng = Engine.from_loaded(backend=backend)
    res = eng.run(TaskRequest("complete", src, "a.py", 1, 18))
    prompt = tiny_tokenizer.decode(backend.prompts[-1])
    assert "text." in prompt and "text.sp" not in prompt  # the typed "sp" is left to the model
    assert res.text == "lit()"  # "split()" minus the "sp" already in the buffer
    eng.close()


def test_completion_after_the_indentation_starts_the_prompt_at_the_line_start(tiny_tokenizer):
    """An editor's cursor sits after the indentation; the model's middles begin at a line start.
    The prompt stops at the line start and the typed indentation is dropped from the answer."""
    from assistant_fakes import ScriptedBackend

    from assistant.engine import Engine
    from assistant.tasks import TaskRequest, healing_text

    assert healing_text("        ", 8) == "        " and healing_text("    x = a.b", 11) == "b"
    assert healing_text("    x", 2) == "  " and healing_text("", 0) == ""
    src = "def f(x):\n    \n"
    backend = ScriptedBackend(tiny_tokenizer, lambda task, code: ("", "    return x"))
    eng = Engine.from_loaded(backend=backend)
    res = eng.run(TaskRequest("complete", src, "a.py", 1, 4))
    prompt = tiny_tokenizer.decode(backend.prompts[-1])
    assert "def f(x):\n" in prompt and "    " not in prompt  # the indentation is the model's to write
    assert res.text == "return x"  # the typed indentation is not inserted twice
    eng.close()


def test_healed_indentation_on_the_tiny_model_is_spelled_first(tiny_model_dir):
    from model.checkpoint import load_model

    loaded = load_model(str(tiny_model_dir))
    tok = loaded.tokenizer
    out = generate(loaded.model, tok, tok.encode("def f(x):\n"), SamplingParams(max_new_tokens=8, heal="        "))
    assert out.text.startswith("        "), repr(out.text)
