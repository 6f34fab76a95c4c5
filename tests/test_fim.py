"""The FIM transform on token documents (model/data/fim.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data.fim import (
    FIMConfig,
    FIMTokens,
    choose_cuts,
    fim_length,
    fim_transform,
    line_boundaries,
    newline_mask,
    next_cut,
    plan_fim,
    split_long,
)

# A fake vocabulary for the pure tests: ids 0..99 are text, 3 and 7 contain a newline.
SPECIAL = FIMTokens(prefix=100, suffix=101, middle=102, eos=103)
NL = np.zeros(104, dtype=bool)
NL[[3, 7]] = True


def _parts(out: np.ndarray, spm: bool) -> tuple[list[int], list[int], list[int]]:
    """Split a FIM'd sequence back into (prefix, middle, suffix)."""
    o = out.tolist()
    assert o[-1] == SPECIAL.eos
    m = o.index(SPECIAL.middle)
    middle = o[m + 1 : -1]
    if spm:
        assert o[0] == SPECIAL.suffix
        p = o.index(SPECIAL.prefix)
        return o[p + 1 : m], middle, o[1:p]
    assert o[0] == SPECIAL.prefix
    s = o.index(SPECIAL.suffix)
    return o[1:s], middle, o[s + 1 : m]


def test_no_fim_returns_document_with_eos():
    doc = np.arange(20)
    out = fim_transform(doc, np.random.default_rng(0), SPECIAL, FIMConfig(fim_rate=0.0))
    assert out.tolist() == [*range(20), SPECIAL.eos]
    out = fim_transform(doc, np.random.default_rng(0), SPECIAL, FIMConfig(fim_rate=0.0), end_with_eos=False)
    assert out.tolist() == list(range(20))


@pytest.mark.parametrize("spm", [False, True])
def test_fim_orders_and_reconstructs(spm):
    doc = np.arange(10, 60) % 100
    cfg = FIMConfig(fim_rate=1.0, spm_rate=1.0 if spm else 0.0, line_rate=0.0)
    for seed in range(20):
        out = fim_transform(doc, np.random.default_rng(seed), SPECIAL, cfg, NL)
        assert len(out) == len(doc) + 4
        prefix, middle, suffix = _parts(out, spm)
        assert prefix + middle + suffix == doc.tolist()


def test_line_mode_middle_is_whole_lines():
    rng = np.random.default_rng(1)
    doc = rng.integers(10, 100, size=200)
    doc[rng.choice(200, size=25, replace=False)] = 3  # newline tokens
    doc[rng.choice(200, size=5, replace=False)] = 7
    cfg = FIMConfig(fim_rate=1.0, spm_rate=0.5, line_rate=1.0)
    single = 0
    for seed in range(200):
        out = fim_transform(doc, np.random.default_rng(seed), SPECIAL, cfg, NL)
        spm = out[0] == SPECIAL.suffix
        prefix, middle, suffix = _parts(out, spm)
        assert prefix + middle + suffix == doc.tolist()
        assert middle, "line mode always takes at least one line"
        # the middle starts a line and ends one (or ends the document)
        assert not prefix or NL[prefix[-1]]
        assert NL[middle[-1]] or not suffix
        single += sum(NL[t] for t in middle[:-1]) == 0
    assert 60 < single < 200  # about half the middles are exactly one line


def test_rates_are_respected():
    doc = np.arange(10, 90)
    cfg = FIMConfig(fim_rate=0.5, spm_rate=0.5, line_rate=0.5)
    n_fim = n_spm = 0
    for seed in range(2000):
        out = fim_transform(doc, np.random.default_rng(seed), SPECIAL, cfg, NL)
        if out[0] in (SPECIAL.prefix, SPECIAL.suffix):
            n_fim += 1
            n_spm += out[0] == SPECIAL.suffix
    assert 900 < n_fim < 1100
    assert 0.4 < n_spm / n_fim < 0.6


def test_same_rng_same_output():
    doc = np.arange(100) % 50
    cfg = FIMConfig(fim_rate=1.0)
    a = fim_transform(doc, np.random.default_rng([7, 3]), SPECIAL, cfg, NL)
    b = fim_transform(doc, np.random.default_rng([7, 3]), SPECIAL, cfg, NL)
    c = fim_transform(doc, np.random.default_rng([7, 4]), SPECIAL, cfg, NL)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_bad_rates_rejected():
    with pytest.raises(ValueError, match="fim_rate"):
        FIMConfig(fim_rate=1.5)


def test_line_boundaries_and_cuts():
    doc = np.array([10, 3, 11, 12, 7, 13])
    assert line_boundaries(doc, NL).tolist() == [0, 2, 5, 6]
    rng = np.random.default_rng(0)
    for _ in range(50):
        i, j = choose_cuts(6, rng, line_boundaries(doc, NL))
        assert i < j and i in (0, 2, 5) and j in (2, 5, 6)
        i, j = choose_cuts(6, rng)
        assert 0 <= i <= j <= 6


def test_split_long_prefers_line_ends():
    doc = np.array([10] * 7 + [3] + [10] * 30)
    chunks = split_long(doc, 10, NL)
    assert np.concatenate(chunks).tolist() == doc.tolist()
    assert all(len(c) <= 10 for c in chunks)
    assert chunks[0].tolist()[-1] == 3  # cut right after the newline
    assert [len(c) for c in split_long(doc, 100, NL)] == [len(doc)]


@settings(max_examples=60, deadline=None)
@given(
    doc=st.lists(st.integers(0, 99), min_size=0, max_size=80),
    seed=st.integers(0, 2**32 - 1),
    line_rate=st.sampled_from([0.0, 1.0]),
)
def test_fim_is_a_permutation_of_the_document(doc, seed, line_rate):
    cfg = FIMConfig(fim_rate=1.0, spm_rate=0.5, line_rate=line_rate)
    out = fim_transform(np.array(doc, dtype=np.int64), np.random.default_rng(seed), SPECIAL, cfg, NL)
    if not doc:
        assert out.tolist() == [SPECIAL.eos]
        return
    prefix, middle, suffix = _parts(out, out[0] == SPECIAL.suffix)
    assert prefix + middle + suffix == doc


def test_with_real_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    special = FIMTokens.from_tokenizer(tok)
    assert special.eos == tok.eos_id
    assert special.prefix == tok.special_id("fim_prefix")
    mask = newline_mask(tok)
    assert mask.shape == (tok.vocab_size,)
    assert not mask[[special.prefix, special.suffix, special.middle, special.eos]].any()
    text = "def f(x):\n    y = x + 1\n    return y\n\n\nclass A:\n    pass\n"
    ids = np.array(tok.encode(text))
    assert mask[ids].sum() >= 1
    assert all(("\n" in tok.decode([i])) == bool(mask[i]) for i in ids.tolist())
    cfg = FIMConfig(fim_rate=1.0, spm_rate=0.0, line_rate=1.0)
    for seed in range(30):
        out = fim_transform(ids, np.random.default_rng(seed), special, cfg, mask)
        o = out.tolist()
        s, m = o.index(special.suffix), o.index(special.middle)
        prefix, suffix, middle = o[1:s], o[s + 1 : m], o[m + 1 : -1]
        assert tok.decode(prefix) + tok.decode(middle) + tok.decode(suffix) == text
        assert "\n" in tok.decode(middle[-1:])  # ends at a line boundary (text ends with one)
    # the PSM layout matches the run-time prompt of model.formats for the same split
    from model import formats

    p_txt, m_txt, s_txt = "def f(x):\n", "    y = x + 1\n", "    return y\n"
    ex = formats.fim_example(tok, p_txt, m_txt, s_txt)
    assert ex[0] == special.prefix and ex[-1] == special.eos


def test_next_cut_slack_and_split_long_agree():
    doc = np.array([10] * 7 + [3] + [10] * 30 + [7] + [10] * 5)
    assert next_cut(doc, 0, 100, NL) == len(doc)  # the rest fits
    assert next_cut(doc, 0, 10, NL) == 8  # after the newline in the window's second half
    assert next_cut(doc, 0, 10, NL, slack=2) == 10  # no newline in the last 2: a hard cut
    assert next_cut(doc, 0, 40, NL, slack=5) == 39
    assert next_cut(doc, 8, 10, None) == 18
    ends, start = [], 0
    while start < len(doc):
        start = next_cut(doc, start, 10, NL)
        ends.append(start)
    assert np.cumsum([len(c) for c in split_long(doc, 10, NL)]).tolist() == ends


def test_fim_length_and_plan_match_transform():
    doc = np.arange(10, 40)
    cfg = FIMConfig(fim_rate=0.5, spm_rate=0.5, line_rate=0.0)
    for seed in range(40):
        plan = plan_fim(np.random.default_rng(seed), cfg)
        out = fim_transform(doc, np.random.default_rng(seed), SPECIAL, cfg, NL)
        assert plan.fim == (out[0] in (SPECIAL.prefix, SPECIAL.suffix))
        if plan.fim:
            assert len(out) == fim_length(len(doc)) and (out[0] == SPECIAL.suffix) == plan.spm
