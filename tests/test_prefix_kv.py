"""The previous generation's KV cache serves the next prompt that starts the same way
(an editor's completions at successive keystrokes): same tokens, fewer prefilled."""

from __future__ import annotations

import pytest
import torch

from model.generate import SamplingParams, generate, generate_batch, stream


@pytest.fixture()
def loaded(tiny_model_dir):
    from model.checkpoint import load_model

    return load_model(str(tiny_model_dir))


def _prompts(tok):
    base = tok.encode("def total(values):\n    result = 0\n    for v in values:\n        result += v\n    return result\n" * 8)
    assert len(base) > 160
    return [base[:120], base[:120], base[:124], base[:140], base[:90], base[:90] + base[10:20]]


def _run(model, tok, prompts, params):
    return [generate(model, tok, p, params) for p in prompts]


def test_reused_prefix_gives_the_same_tokens_as_a_fresh_cache(loaded, monkeypatch):
    model, tok = loaded.model, loaded.tokenizer
    params = SamplingParams(max_new_tokens=12)
    prompts = _prompts(tok)
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    fresh = _run(model, tok, prompts, params)
    assert all(r.cached_tokens == 0 for r in fresh)
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "1")
    reused = _run(model, tok, prompts, params)
    assert [r.token_ids for r in reused] == [r.token_ids for r in fresh]
    cached = [r.cached_tokens for r in reused]
    # the first prompt finds nothing from this test's run before it (another test's cache at most)
    assert cached[1] == 119  # the same prompt again: all but the last token (its logits are needed)
    assert cached[2] >= 120 and cached[3] >= 124  # a longer prompt: at least the earlier one
    assert cached[4] == 89  # a shorter one: its own length less one
    assert cached[5] == 90  # the same start, then different tokens


def test_changed_weights_drop_the_cache(loaded):
    model, tok = loaded.model, loaded.tokenizer
    params = SamplingParams(max_new_tokens=4)
    p = _prompts(tok)[0]
    generate(model, tok, p, params)
    assert generate(model, tok, p, params).cached_tokens == len(p) - 1
    with torch.no_grad():
        model.tok_emb.weight.mul_(1.01)  # what an optimizer step does: an in-place update
    assert generate(model, tok, p, params).cached_tokens == 0


def test_a_generation_running_meanwhile_prefills_from_scratch(loaded):
    model, tok = loaded.model, loaded.tokenizer
    params = SamplingParams(max_new_tokens=6)
    p = _prompts(tok)[0]
    generate(model, tok, p, params)
    first = stream(model, tok, p, params)
    next(first)  # holds the cache now
    other = generate(model, tok, p, params)
    assert other.cached_tokens == 0
    for _ in first:
        pass
    assert first.result.token_ids == other.token_ids and first.result.cached_tokens == len(p) - 1


def test_a_cancelled_generation_leaves_only_what_it_wrote(loaded, monkeypatch):
    from model.cancel import CancelToken

    model, tok = loaded.model, loaded.tokenizer
    params = SamplingParams(max_new_tokens=10)
    p = _prompts(tok)[3]
    cancel = CancelToken()
    s = stream(model, tok, p, params, cancel)
    got = [next(s).token_id for _ in range(3)]
    cancel.cancel()
    for _ in s:
        pass
    assert s.result.finish_reason == "cancelled" and s.result.token_ids[:3] == got
    longer = list(p) + got + [5, 6]
    again = generate(model, tok, longer, params)
    # the prompt and the two tokens fed back before the cancel; the third was sampled, never written
    assert again.cached_tokens == len(p) + 2
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    assert generate(model, tok, longer, params).token_ids == again.token_ids


def test_batches_of_several_prompts_do_not_use_it(loaded):
    model, tok = loaded.model, loaded.tokenizer
    p = _prompts(tok)[0]
    generate(model, tok, p, SamplingParams(max_new_tokens=2))
    out = generate_batch(model, tok, [p, p[:100]], SamplingParams(max_new_tokens=2))
    assert [r.cached_tokens for r in out] == [0, 0]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2"])
def test_open_checkpoints_reuse_the_prefix_too(tmp_path, family, monkeypatch):
    """GQA + QK-norm caches and MLA's compressed latent cache: the reused prefix gives the
    tokens a fresh cache gives."""
    pytest.importorskip("transformers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_tiny import load_tiny

    model, tok = load_tiny(family, tmp_path / family)
    base = [(7 * i) % 250 + 3 for i in range(60)]
    prompts = [base[:40], base[:44], base[:52], base[:30]]
    params = SamplingParams(max_new_tokens=8)
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    fresh = [generate(model, tok, p, params).token_ids for p in prompts]
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "1")
    reused = [generate(model, tok, p, params) for p in prompts]
    assert [r.token_ids for r in reused] == fresh
    assert reused[3].cached_tokens == 29  # a shorter prompt: all but its last token
    assert reused[1].cached_tokens >= 40 and reused[2].cached_tokens >= 44


def test_a_cache_over_the_byte_budget_is_not_kept(loaded, monkeypatch):
    import copy

    from model.generate import PrefixKV

    model, tok = copy.deepcopy(loaded.model), loaded.tokenizer  # a model no cache was kept for yet
    params = SamplingParams(max_new_tokens=4)
    p = _prompts(tok)[0]
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "0")
    fresh = generate(model, tok, p, params)
    monkeypatch.setenv("MOECODER_PREFIX_CACHE", "1")
    monkeypatch.setattr(PrefixKV, "MAX_BYTES", 1024)  # fewer positions than this prompt needs
    again = [generate(model, tok, p, params) for _ in range(2)]
    assert [r.cached_tokens for r in again] == [0, 0] and again[0].token_ids == fresh.token_ids
    monkeypatch.undo()
    generate(model, tok, p, params)
    assert generate(model, tok, p, params).cached_tokens == len(p) - 1  # kept under the real budget
