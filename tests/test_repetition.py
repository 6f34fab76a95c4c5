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
