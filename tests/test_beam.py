"""Beam search for single-line completions (``SamplingParams.beams``, ``model.generate._beam_decode``)."""

from __future__ import annotations

import pytest
import torch

from model.cancel import CancelToken
from model.generate import (
    BEAM_LENGTH_ALPHA,
    GenerationResult,
    SamplingParams,
    _beam_decode,
    generate,
    generate_batch,
    stream,
    token_logprobs,
)


@pytest.fixture()
def loaded(tiny_model_dir):
    from model.checkpoint import load_model

    return load_model(str(tiny_model_dir))


def _prompts(tok):
    code = "def total(values):\n    result = 0\n    for v in values:\n        result += v\n    return result\n" * 4
    ids = tok.encode(code)
    return [ids[:40], ids[:57], ids[:90], tok.encode("import os\nimport sys\n\n\ndef main(")]


def _score(r: GenerationResult) -> float:
    return sum(r.logprobs) / len(r.token_ids) ** BEAM_LENGTH_ALPHA


def test_one_beam_is_the_greedy_answer(loaded, monkeypatch):
    """Width 1 through the beam code = the greedy loop: same tokens, log-probs, text, reason."""
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    model, tok = loaded.model, loaded.tokenizer
    for stops in ((), ("\n",)):
        params = SamplingParams(max_new_tokens=16, stop_strings=stops)
        for p in _prompts(tok):
            greedy = generate(model, tok, p, params)
            res = GenerationResult("")
            with torch.inference_mode():
                list(_beam_decode(model, tok, p, SamplingParams(max_new_tokens=16, stop_strings=stops), None, res))
            assert res.token_ids == greedy.token_ids
            assert res.text == greedy.text and res.finish_reason == greedy.finish_reason
            assert res.logprobs == pytest.approx(greedy.logprobs, abs=1e-4)


def test_beams_reorder_the_cache_correctly(loaded, monkeypatch):
    """Each reported log-prob is the model's for the chosen sequence from scratch: the rows'
    caches followed their parents as beams were picked."""
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    model, tok = loaded.model, loaded.tokenizer
    for p in _prompts(tok):
        r = generate(model, tok, p, SamplingParams(max_new_tokens=12, beams=4))
        assert r.token_ids
        ref = token_logprobs(model, [*p, *r.token_ids])[len(p):]
        assert r.logprobs == pytest.approx(ref, abs=1e-4)


def test_beam_answer_scores_at_least_the_greedy_one_and_streams_its_text(loaded, monkeypatch):
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    model, tok = loaded.model, loaded.tokenizer
    params = dict(max_new_tokens=12, stop_strings=("\n",))
    better = 0
    for p in _prompts(tok):
        greedy = generate(model, tok, p, SamplingParams(**params))
        s = stream(model, tok, p, SamplingParams(**params, beams=6))
        events = list(s)
        r = s.result
        assert "".join(e.text for e in events) == r.text and "\n" not in r.text
        assert [e.token_id for e in events] == r.token_ids
        assert greedy.finish_reason in ("stop", "length") and r.finish_reason in ("stop", "length")
        assert _score(r) >= _score(greedy) - 1e-5
        better += _score(r) > _score(greedy) + 1e-5
    assert better >= 2  # the search finds likelier answers than greedy on this random model


def test_beams_share_the_prefix_cache(loaded, monkeypatch):
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    model, tok = loaded.model, loaded.tokenizer
    params = SamplingParams(max_new_tokens=10, beams=3, stop_strings=("\n",))
    p = _prompts(tok)[2]
    fresh = generate(model, tok, p, params)
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "1")
    generate(model, tok, p[:80], params)
    again = generate(model, tok, p, params)
    assert again.cached_tokens >= 79 and again.token_ids == fresh.token_ids


def test_beam_search_keeps_healing_cancel_and_batches(loaded):
    model, tok = loaded.model, loaded.tokenizer
    p = _prompts(tok)[1]
    r = generate(model, tok, p, SamplingParams(max_new_tokens=8, beams=3, heal="    re"))
    assert r.text.startswith("    re")
    cancel = CancelToken()
    cancel.cancel()
    assert generate(model, tok, p, SamplingParams(max_new_tokens=8, beams=3), cancel).finish_reason == "cancelled"
    params = SamplingParams(max_new_tokens=8, beams=3)
    batch = generate_batch(model, tok, _prompts(tok), params, batch_size=4)
    assert [b.token_ids for b in batch] == [generate(model, tok, q, params).token_ids for q in _prompts(tok)]
    with pytest.raises(ValueError, match="beams"):
        SamplingParams(beams=0).validate()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_open_checkpoints_search_beams_too(tmp_path, family, monkeypatch):
    """GQA + QK-norm caches and MLA's compressed latent cache: rows reordered correctly."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_tiny import load_tiny

    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    model, tok = load_tiny(family, tmp_path / family)
    p = [(11 * i) % 250 + 3 for i in range(40)]
    r = generate(model, tok, p, SamplingParams(max_new_tokens=10, beams=4))
    assert len(r.token_ids) == 10  # ten steps: rows reordered nine times
    ref = token_logprobs(model, [*p, *r.token_ids])[len(p):]
    assert r.logprobs == pytest.approx(ref, abs=1e-5)
    greedy = generate(model, tok, p, SamplingParams(max_new_tokens=10))
    assert sum(r.logprobs) / len(r.logprobs) ** BEAM_LENGTH_ALPHA >= (
        sum(greedy.logprobs) / len(greedy.logprobs) ** BEAM_LENGTH_ALPHA - 1e-5)  # batched rows: float noise


def test_continuation_logprobs_match_one_forward_each(loaded):
    """The batched scorer (context prefilled once, continuations right-padded in one batch) gives
    each continuation's summed log-probability as a plain forward over context + continuation."""
    from model.generate import continuation_logprobs

    model, tok = loaded.model, loaded.tokenizer
    ctx = tok.encode("def total(values):\n    result = 0\n")
    conts = [tok.encode("    for v in values:\n"), tok.encode("    return"), tok.encode("x")]
    got = continuation_logprobs(model, ctx, conts)
    for c, g in zip(conts, got):
        with torch.no_grad():
            lp = model(torch.tensor([ctx + c]))[0].log_softmax(-1)
        want = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(c))
        assert g == pytest.approx(want, abs=1e-3)
    with pytest.raises(ValueError, match="context"):
        continuation_logprobs(model, [], conts)
    with pytest.raises(ValueError, match="continuations"):
        continuation_logprobs(model, ctx, [conts[0], []])


def test_continuation_logprobs_with_a_mix(loaded):
    """With ``mix`` (the repository's memory) each scored position's distribution is the mix of the
    model's logits there and the head's input there, as in the decode: the same sums as a plain
    forward over context + continuation with the mix applied position by position."""
    from model.generate import continuation_logprobs

    model, tok = loaded.model, loaded.tokenizer
    ctx = tok.encode("def total(values):\n    result = 0\n")
    conts = [tok.encode("    for v in values:\n"), tok.encode("    return")]
    seen = []

    def mix(logits_BV, h_BD):  # favours the tokens whose head input has a positive first coordinate
        seen.append(h_BD.shape[0])
        return logits_BV + 3.0 * (h_BD[:, :1] > 0).float() * torch.nn.functional.one_hot(
            torch.tensor(5), logits_BV.shape[-1]).float()

    got = continuation_logprobs(model, ctx, conts, mix=mix)
    plain = continuation_logprobs(model, ctx, conts)
    heads = []
    hook = model.norm.register_forward_hook(lambda _m, _a, out: heads.append(out))
    try:
        for c, g, p in zip(conts, got, plain):
            heads.clear()
            with torch.no_grad():
                logits = model(torch.tensor([ctx + c]))[0].float()
            h = heads[0][0]
            rows = range(len(ctx) - 1, len(ctx) - 1 + len(c))
            lp = mix(logits[list(rows)], h[list(rows)]).log_softmax(-1)
            want = sum(float(lp[i, t]) for i, t in enumerate(c))
            assert g == pytest.approx(want, abs=1e-3)
            assert abs(g - p) > 1e-3 or all(float(h[r, 0]) <= 0 for r in rows)
    finally:
        hook.remove()
    assert seen[0] == len(conts) * max(len(c) for c in conts)  # one call: every row of every continuation
    assert not model.norm._forward_hooks  # the scorer's hook is gone


def test_rerank_picks_among_the_finished_beams(loaded, monkeypatch):
    """SamplingParams.rerank sees every finished answer; its extra score decides the pick (here: an
    answer other than the beam score's best), and the emitted tokens are that answer's."""
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    model, tok = loaded.model, loaded.tokenizer
    p = _prompts(tok)[1]
    params = SamplingParams(max_new_tokens=8, beams=4, stop_strings=("\n",))
    plain = generate(model, tok, p, params)
    seen = []

    def first_other(m, answers):  # +1e6 for the first answer that is not the plain pick
        scores = [0.0] * len(answers)
        scores[next(i for i, a in enumerate(answers) if list(a) != plain.token_ids)] = 1e6
        seen.append([list(a) for a in answers])
        return scores

    r = generate(model, tok, p, SamplingParams(max_new_tokens=8, beams=4, stop_strings=("\n",), rerank=first_other))
    assert len(seen) == 1 and len(seen[0]) >= 2 and plain.token_ids in seen[0]
    want = next(a for a in seen[0] if a != plain.token_ids)
    assert r.token_ids == want and r.text == tok.decode(want).split("\n")[0] + "\n" * ("\n" in tok.decode(want))
    assert generate(model, tok, p, params).token_ids == plain.token_ids  # no rerank: the beam score's pick
