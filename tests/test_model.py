"""The MoE transformer: config, KV cache exactness, dropless routing, balance statistics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from model.config import PRESETS, ModelConfig, get_preset, param_counts
from model.layers import attention_mask
from model.transformer import Transformer


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(get_preset("tiny"), **kw)


def make(cfg=None, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg or tiny()).eval()


# ---------------------------------------------------------------- config
def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="tiny, small, base"):
        get_preset("huge")


def test_config_roundtrip_and_validation():
    cfg = get_preset("small")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="score_func"):
        tiny(score_func="relu")
    assert get_preset("tiny") is not get_preset("tiny")  # fresh copies


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_counts_match_the_module(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    total, active = param_counts(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    assert active < total


def test_preset_sizes():
    small_total, _ = param_counts(get_preset("small"))
    # int8 weights + fp16 scales must fit in 40 MiB
    assert small_total <= 39 * 2**20
    base_total, _ = param_counts(get_preset("base"))
    assert 0.8e9 < base_total < 1.3e9


# ---------------------------------------------------------------- attention / cache
def test_mask_is_bottom_right_aligned():
    m = attention_mask(3, 2, None, "cpu")[0, 0]
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_kv_cache_decode_and_chunked_prefill_equal_full_recompute(score_func):
    model = make(tiny(score_func=score_func))
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(x)
        cache = model.setup_cache(2, 64)
        parts = [model(x[:, :5], 0, cache), model(x[:, 5:9], 5, cache), model(x[:, 9:16], 9, cache)]
        parts += [model(x[:, t:t + 1], t, cache) for t in range(16, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    assert full.dtype == torch.float32 and full.shape == (2, 24, 512)


def test_last_only_logits():
    model = make()
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full, last = model(x), model(x, last_only=True)
    assert last.shape == (2, 1, 512)
    torch.testing.assert_close(last, full[:, -1:])


def test_left_padded_batch_matches_single_rows():
    model = make()
    a, b = torch.randint(3, 512, (1, 10)), torch.randint(3, 512, (1, 6))
    with torch.no_grad():
        ref_a, ref_b = model(a), model(b)
        batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        cache = model.setup_cache(2, 32)
        cache.set_padding([0, 4])
        out = model(batch, 0, cache)
        nxt = torch.randint(3, 512, (2, 1))
        step = model(nxt, 10, cache)
        ref_a2, ref_b2 = model(torch.cat([a, nxt[:1]], 1)), model(torch.cat([b, nxt[1:]], 1))
    torch.testing.assert_close(out[0], ref_a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1, 4:], ref_b[0], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(step[0, 0], ref_a2[0, -1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step[1, 0], ref_b2[0, -1], atol=1e-5, rtol=1e-4)


def test_sequence_longer_than_cache_is_refused():
    model = make()
    cache = model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 9, dtype=torch.long), 0, cache)
    with pytest.raises(ValueError, match="exceeds"):
        model.setup_cache(1, 10_000)


# ---------------------------------------------------------------- MoE
def test_dropless_every_token_reaches_top_k_experts():
    cfg = tiny(n_layers=3, n_dense_layers=1, n_experts=8, top_k=3)
    model = make(cfg)
    x = torch.randint(0, 512, (3, 17))
    with torch.no_grad():
        model(x)
    stats = model.last_stats
    assert len(stats["tokens_per_expert"]) == 2
    for counts in stats["tokens_per_expert"]:
        assert sum(counts) == 3 * 17 * 3


def test_moe_counts_match_the_routing():
    moe = make(tiny(n_experts=8, top_k=3)).moe_layers()[0]
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        moe(x)
        logits = torch.nn.functional.linear(x.reshape(-1, 64), moe.gate.weight)
        _, experts = kernels.route(logits, moe.top_k, moe.score_func, None, moe.renormalize)
    want = torch.bincount(experts.reshape(-1), minlength=8).float()
    assert torch.equal(moe.last["counts"], want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA host syncs")
def test_prefill_forward_does_not_sync_with_the_host():
    model = make(tiny(n_layers=3, n_dense_layers=1)).cuda()
    x = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        model(x)  # warm-up (autotuning, lazy init)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_moe_block_matches_the_per_expert_loop():
    moe = make().moe_layers()[0]
    x = torch.randn(1, 13, 64)
    with torch.no_grad():
        y = moe(x)
        logits = torch.nn.functional.linear(x[0], moe.gate.weight)
        w, e = kernels.route(logits, moe.top_k, moe.score_func)
        ref = kernels.moe_experts_loop(x[0], w, e, moe.experts.w_gate, moe.experts.w_up, moe.experts.w_down) + moe.shared(x[0])
    torch.testing.assert_close(y[0], ref, atol=1e-5, rtol=1e-4)


def test_aux_losses_are_exposed_weighted_and_differentiable():
    model = make().train()
    x = torch.randint(0, 512, (2, 16))
    logits = model(x)
    aux = model.aux_loss()
    stats = model.last_stats
    moe = model.moe_layers()[0]
    expected = 0.01 * moe.last["balance_loss"] + 1e-3 * moe.last["z_loss"]
    torch.testing.assert_close(aux, expected)
    assert stats["balance_loss"] > 0
    assert stats["z_loss"] > 0
    (logits.logsumexp(-1).mean() + aux).backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.w_down.grad.abs().sum() > 0
    off = make(tiny(aux_loss_coef=0.0, z_loss_coef=0.0)).train()
    off(x)
    assert float(off.aux_loss()) == 0.0


def test_balance_statistics_respond_to_the_bias_update():
    model = make(tiny(n_experts=4, top_k=1, bias_update_rate=0.02)).train()
    moe = model.moe_layers()[0]
    with torch.no_grad():  # skew the selection: expert 0 wins for almost every token
        moe.expert_bias[0] = 0.5
    x = torch.randint(0, 512, (4, 64))
    with torch.no_grad():
        model(x)
    before = model.last_stats["max_imbalance"]
    assert before > 2.0
    for _ in range(60):
        with torch.no_grad():
            model(x)
        model.update_bias()
    model.eval()
    with torch.no_grad():
        model(x)
    after = model.last_stats["max_imbalance"]
    assert after < before / 1.5
    assert float(moe.expert_bias[0]) < 0.5 and float(moe.counts_acc.sum()) == 0.0


def test_no_bias_when_disabled():
    model = make(tiny(bias_update_rate=0.0)).train()
    with torch.no_grad():
        model(torch.randint(0, 512, (2, 8)))
    model.update_bias()
    assert float(model.moe_layers()[0].expert_bias.abs().sum()) == 0.0


def test_meta_init_then_materialise():
    with torch.device("meta"):
        model = Transformer(tiny())
    model.to_empty(device="cpu")
    model.init_weights()
    out = model(torch.randint(0, 512, (1, 8)))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- bench
def test_bench_runs_and_rejects_bad_input(capsys):
    from model.bench import main

    assert main(["--presets", "tiny", "--batches", "1,2", "--new-tokens", "4", "--repeats", "1",
                 "--prompt-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "load average" in out
    rows = [ln for ln in out.splitlines() if ln.startswith("tiny")]
    assert len(rows) == 2
    assert main(["--presets", "huge"]) == 2
    assert "unknown model preset 'huge'" in capsys.readouterr().err
    assert main(["--device", "tpu"]) == 2
