"""Watermark: g-values, the exact tournament, the null distribution, generation + detection
with a tiny random model (high entropy, so marks are strong), edits, keys, the CLI."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from model.checkpoint import load_model
from model.generate import SamplingParams, generate, generate_batch
from model.watermark import (
    Detector,
    Watermark,
    WatermarkError,
    _token_pmf,
    context_seed,
    decide,
    functions,
    g_values,
    main,
    p_value,
    score_tokens,
    tournament_probs,
)

KEY = "test-key"


class _NoBytes(torch.nn.Module):
    """The tiny random model without byte-fallback pieces: a random model samples lone UTF-8
    bytes that do not survive decoding to text (a trained model does not), so text-level
    detection would test the tokenizer instead of the watermark."""

    def __init__(self, model, bad):
        super().__init__()
        self.m, self.cfg, self.tok_emb, self.bad = model, model.cfg, model.tok_emb, torch.tensor(bad)

    def setup_cache(self, *a, **k):
        return self.m.setup_cache(*a, **k)

    def forward(self, *a, **k):
        out = self.m(*a, **k).clone()
        out[..., self.bad] = float("-inf")
        return out


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from model.checkpoint import LoadedModel

    raw = load_model(tiny_model_dir)
    tok = raw.tokenizer
    bad = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)] + [tok.eos_id]  # and run to the length limit
    return LoadedModel(_NoBytes(raw.model, bad), tok, raw.config)


@pytest.fixture(scope="module")
def raw_model(tiny_model_dir):
    return load_model(tiny_model_dir).model


@pytest.fixture(scope="module")
def prompts(loaded):
    tok = loaded.tokenizer
    srcs = ["def add(a, b):\n    ", "import json\n\nclass Box:\n    def __init__(self", "for i in range(10):\n",
            "x = [1, 2, 3]\nprint("]
    return [tok.encode(s) for s in srcs]


@pytest.fixture(scope="module")
def gens(loaded, prompts):
    """Watermarked and plain samples (temperature 1) from the same prompts and seed."""
    wm = Watermark(KEY)
    out = {}
    for name, w in (("wm", wm), ("plain", None)):
        p = SamplingParams(max_new_tokens=64, temperature=1.0, seed=3, watermark=w)
        res = generate_batch(loaded.model, loaded.tokenizer, prompts, p, batch_size=4)
        out[name] = [r.text for r in res]
    return out


def test_g_values_are_keyed_deterministic_and_fair():
    toks = torch.arange(4096)
    a = g_values([context_seed(KEY, [1, 2, 3, 4])], toks, 8)
    b = g_values([context_seed(KEY, [1, 2, 3, 4])], toks, 8)
    c = g_values([context_seed("other", [1, 2, 3, 4])], toks, 8)
    d = g_values([context_seed(KEY, [1, 2, 3, 5])], toks, 8)
    assert a.shape == (1, 8, 4096) and set(a.unique().tolist()) <= {0, 1}
    assert torch.equal(a, b)
    for other in (c, d):
        agree = (a == other).float().mean().item()
        assert 0.45 < agree < 0.55  # independent bits
    assert 0.48 < a.float().mean().item() < 0.52
    # per-row tokens [N, K] agree with shared tokens [K]
    sub = g_values([context_seed(KEY, [1, 2, 3, 4])], toks[None, 100:110], 8)
    assert torch.equal(sub, a[:, :, 100:110])


def test_tournament_probs_equal_a_brute_force_tournament():
    rng = random.Random(0)
    V, m = 3, 2
    p = [0.5, 0.3, 0.2]
    g = [[rng.randrange(2) for _ in range(V)] for _ in range(m)]
    # brute force: 2**m iid candidates, knockout rounds, fair coin on ties
    exact = [0.0] * V

    def play(cands, layer, weight):
        if len(cands) == 1:
            exact[cands[0]] += weight
            return
        nxt_opts = [[]]
        for a, b in zip(cands[::2], cands[1::2]):
            if g[layer][a] != g[layer][b]:
                win = [a if g[layer][a] > g[layer][b] else b]
            else:
                win = [a, b]
            nxt_opts = [o + [w] for o in nxt_opts for w in win]
        for o in nxt_opts:
            play(o, layer + 1, weight / len(nxt_opts))

    for cands in itertools.product(range(V), repeat=2 ** m):
        w = 1.0
        for c in cands:
            w *= p[c]
        play(list(cands), 0, w)
    got = tournament_probs(torch.tensor([p], dtype=torch.float64), torch.tensor([g]))[0].tolist()
    assert got == pytest.approx(exact, abs=1e-12)


def test_tournament_on_the_top_tokens_equals_the_full_one_with_neutral_rest():
    from model.watermark import tournament_top

    torch.manual_seed(1)
    V, k, m = 200, 20, 6
    p = torch.softmax(torch.randn(3, V) * 2, -1).double()
    top_i = p.topk(k, dim=-1).indices
    g_top = g_values([1, 2, 3], top_i, m)
    full = torch.full((3, m, V), 0.5, dtype=torch.double)
    full.scatter_(-1, top_i[:, None, :].expand(-1, m, -1), g_top.double())
    got = tournament_top(p, top_i, g_top)
    assert torch.allclose(got, tournament_probs(p, full), atol=1e-12)
    assert torch.allclose(got.sum(-1), torch.ones(3, dtype=torch.double))


def test_tournament_is_unbiased_over_keys():
    """Averaged over contexts (fresh g-values), the watermarked distribution is the model's."""
    torch.manual_seed(0)
    V = 50
    p = torch.softmax(torch.randn(V) * 2, 0)[None].double()
    g = g_values(list(range(4000)), torch.arange(V), 16).double()
    avg = tournament_probs(p.expand(len(g), -1), g).mean(0)
    assert (avg - p[0]).abs().max().item() < 0.01
    one = tournament_probs(p, g[:1])[0]  # one context: sharpened towards high g-values
    assert one.max().item() > p.max().item()


def test_null_p_value_is_exact_and_calibrated():
    w = [3, 2, 1]
    pmf1 = _token_pmf(w)
    assert sum(pmf1) == pytest.approx(1.0)
    # two tokens: brute force the tail
    dist = {}
    for a, b in itertools.product(range(len(pmf1)), repeat=2):
        dist[a + b] = dist.get(a + b, 0.0) + pmf1[a] * pmf1[b]
    for t in range(0, 13):
        assert p_value(t, 2, w) == pytest.approx(sum(v for k, v in dist.items() if k >= t), abs=1e-12)
    # random bits: P(p <= 0.05) <= 0.05 (up to sampling noise)
    rng = random.Random(1)
    hits = 0
    for _ in range(2000):
        total = sum(wi * rng.randrange(2) for _ in range(30) for wi in w)
        hits += p_value(total, 30, w) <= 0.05
    assert hits / 2000 <= 0.06


def test_watermarked_generations_are_detected_and_plain_ones_are_not(loaded, gens):
    det = Detector(Watermark(KEY), loaded.tokenizer, entropy="none")
    for text in gens["wm"]:
        r = det.detect(text)
        assert r.verdict == "watermarked" and r.p_value < 1e-4, r
    for text in gens["plain"]:
        r = det.detect(text)
        assert r.verdict == "not watermarked" and r.p_value > 0.01, r


def test_wrong_key_scores_as_unwatermarked(loaded, gens):
    det = Detector(Watermark("not-the-key"), loaded.tokenizer, entropy="none")
    for text in gens["wm"]:
        r = det.detect(text)
        assert r.verdict == "not watermarked", r
        assert abs(r.z) < 3


def test_model_entropy_filter_keeps_detection(loaded, raw_model, gens):
    det = Detector(Watermark(KEY), loaded.tokenizer, raw_model, entropy="model", min_entropy=0.5)
    for text in gens["wm"]:
        ts = det.token_scores(text)
        assert ts.entropy is not None and len(ts.entropy) == len(ts.positions)
        assert decide(ts, det.wm, "model", 0.5).verdict == "watermarked"
    with pytest.raises(WatermarkError):
        Detector(Watermark(KEY), loaded.tokenizer, None, entropy="model")


def _delete_lines(text: str, frac: float, seed: int) -> str:
    lines = text.split("\n")
    k = round(frac * len(lines))
    drop = set(random.Random(seed).sample(range(len(lines)), k))
    return "\n".join(s for i, s in enumerate(lines) if i not in drop)


def test_edits_degrade_the_score_gracefully(loaded, gens):
    import re

    det = Detector(Watermark(KEY), loaded.tokenizer, entropy="none")
    text = "\n".join(gens["wm"])  # one longer text with several lines
    assert text.count("\n") >= 5
    z0 = det.detect(text).z
    z_del = [det.detect(_delete_lines(text, 0.2, s)).z for s in range(3)]
    names = sorted(set(re.findall(r"[A-Za-z_]\w*", text)))
    renamed = text
    for i, n in enumerate(names[: len(names) // 3]):  # a third of the identifiers renamed
        renamed = re.sub(rf"\b{re.escape(n)}\b", f"v{i}", renamed)
    z_ren = det.detect(renamed).z
    assert sum(z_del) / len(z_del) < z0 and z_ren < z0  # weaker on average ...
    for z in (*z_del, z_ren):  # (one deletion may drop weakly marked lines and gain a little)
        assert 0.3 * z0 < z < 1.1 * z0 and z > 3  # ... but still clearly marked
    # deleting everything but a few tokens: too short to tell
    assert det.detect(text[:20]).verdict == "too short to tell"


def test_sampling_is_deterministic_per_key(loaded, prompts):
    def run(key, seed=5):
        w = Watermark(key) if key else None
        p = SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed, watermark=w)
        return generate(loaded.model, loaded.tokenizer, prompts[0], p).token_ids

    assert run(KEY) == run(KEY)
    assert run(KEY) != run("another key")
    assert run(KEY) != run(None)


def test_greedy_tie_break_is_keyed_and_only_among_near_ties(loaded, prompts):
    tok = loaded.tokenizer

    def run(wm):
        p = SamplingParams(max_new_tokens=32, temperature=0.0, watermark=wm)
        return generate(loaded.model, tok, prompts[1], p).token_ids

    plain = run(None)
    assert run(Watermark(KEY, greedy_margin=0.0)) == plain  # no near ties: greedy unchanged
    wide = Watermark(KEY, greedy_margin=50.0)  # every top-8 token is a candidate
    a, b = run(wide), run(wide)
    assert a == b and a != plain
    assert run(Watermark("other", greedy_margin=50.0)) != a
    r = Detector(wide, tok, entropy="none").detect(tok.decode(a))
    assert r.score > 0.6 and r.p_value < 1e-3


def test_low_entropy_steps_are_left_alone(loaded, prompts):
    p0 = SamplingParams(max_new_tokens=24, temperature=1.0, seed=9)
    p1 = SamplingParams(max_new_tokens=24, temperature=1.0, seed=9, watermark=Watermark(KEY, min_entropy=1e9))
    assert generate(loaded.model, loaded.tokenizer, prompts[2], p0).token_ids == \
        generate(loaded.model, loaded.tokenizer, prompts[2], p1).token_ids


def test_repeated_contexts_are_scored_once():
    ids = [5, 6, 7, 8, 9, 10, 11, 12] * 10
    ts = score_tokens(ids, Watermark(KEY, context=4))
    assert len(ts.positions) == 8  # 8 distinct 4-token windows in a period-8 sequence


def test_functions_split_by_indentation():
    src = ("import os\n\n\ndef a(x):\n    return x\n\n\nclass C:\n    def m(self):\n        def inner():\n"
           "            pass\n        return 1\n\n    async def n(self,\n    y):\n        pass\n")
    got = [(n, a, b) for n, a, b, _ in functions(src)]
    assert got == [("a", 4, 5), ("m", 9, 12), ("n", 14, 16)]


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        SamplingParams(watermark=Watermark("")).validate()
    with pytest.raises(WatermarkError):
        Watermark(KEY, layers=0).validate()


def test_cli_detect(tiny_model_dir, loaded, gens, tmp_path, capsys):
    f_wm, f_plain, f_short = tmp_path / "wm.py", tmp_path / "plain.py", tmp_path / "short.py"
    f_wm.write_text(gens["wm"][0] + "\n" + gens["wm"][1])
    f_plain.write_text(gens["plain"][0])
    f_short.write_text("x = 1\n")
    rc = main(["detect", str(f_wm), str(f_plain), str(f_short), "--key", KEY, "--model", str(tiny_model_dir),
               "--entropy", "none"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out) == 3
    assert "watermarked" in out[0] and "not watermarked" not in out[0]
    assert "not watermarked" in out[1]
    assert "too short to tell" in out[2]
    fn = tmp_path / "fns.py"
    fn.write_text("def f():\n" + "".join(f"    {line}\n" for line in gens["wm"][2].split("\n")) + "\n\ndef g():\n    pass\n")
    assert main(["detect", str(fn), "--key", KEY, "--model", str(tiny_model_dir), "--entropy", "rule",
                 "--per-function", "--json"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2 and '" g"' not in rows[0] and rows[1].endswith('"too short to tell"}')
    assert main(["detect", str(tmp_path / "missing.py"), "--key", KEY]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_settings_switch_the_watermark_on_per_face(loaded):
    from assistant.config import ConfigError, parse_settings
    from assistant.engine import Engine

    s = parse_settings({"watermark": {"key": "K1"}, "lsp": {"watermark_key": ""}, "review": {"watermark_key": "K2"}})
    assert s.for_face("chat").watermark() == Watermark("K1")
    assert s.for_face("review").watermark() == Watermark("K2")
    assert s.for_face("lsp").watermark() is None
    assert parse_settings({}).for_face("tasks").watermark() is None  # off by default
    for bad in ({"watermark": {"key": ""}}, {"watermark": {"key": 3}}, {"watermark": {"salt": "x"}}):
        with pytest.raises(ConfigError, match="watermark"):
            parse_settings(bad)
    eng = Engine.from_loaded(loaded, **s.for_face("chat").engine_options())
    assert eng.sampling_params(8, None).watermark == Watermark("K1")
    assert Engine.from_loaded(loaded).sampling_params(8, None).watermark is None


def test_batching_scheduler_watermarks_too(loaded, prompts):
    from model.batching import BatchScheduler

    wm = Watermark(KEY)
    sched = BatchScheduler(loaded.model, loaded.tokenizer, max_batch=4).start()
    try:
        hs = [sched.submit(p, SamplingParams(max_new_tokens=48, temperature=1.0, seed=4, watermark=w))
              for p, w in ((prompts[0], wm), (prompts[1], None))]
        got = [list(h) and h.result.token_ids for h in hs]
    finally:
        sched.close()
    marked = decide(score_tokens(prompts[0][-4:] + got[0], wm), wm)
    plain = decide(score_tokens(prompts[1][-4:] + got[1], wm), wm)
    assert marked.verdict == "watermarked" and plain.verdict == "not watermarked", (marked, plain)


def test_cli_defaults_agree_with_the_watermark_defaults():
    from model.cli_args import watermark_parser
    from model.watermark import DEFAULT_MIN_TOKENS, ENTROPY_MODES

    a = watermark_parser().parse_args(["detect", "f.py", "--key", "k"])
    assert (a.context, a.layers, a.min_tokens) == (Watermark.context, Watermark.layers, DEFAULT_MIN_TOKENS)
    entropy = next(x for x in watermark_parser()._actions if x.dest == "entropy")
    assert tuple(entropy.choices) == ENTROPY_MODES


def test_service_passes_the_watermark(tiny_model_dir):
    from assistant.serving import Service

    wm = Watermark(KEY)
    s = Service(str(tiny_model_dir), max_batch=2, watermark=wm)
    try:
        assert s.params(8, 1.0, 1.0, (), 0).watermark == wm
        assert s.engine.sampling_params(8, None).watermark == wm
    finally:
        s.close()


def test_bench_edits():
    from assistant.watermark_bench import delete_lines, rename_identifiers

    code = "def f(items, n):\n    total = len(items)  # count\n    return self.total + n + 'items'\n"
    out = rename_identifiers(code)
    assert out == "def v1(v2, v3):\n    v4 = len(v2)  # count\n    return self.total + v3 + 'items'\n"
    cut = rename_identifiers("def g(a):\n    return (a")  # cut-off code: renames what tokenises
    assert cut.startswith("def v1(v2)")
    text = "\n".join(f"x{i} = {i}" for i in range(10)) + "\n\n"
    kept = delete_lines(text, 0.2, seed=0)
    assert len([s for s in kept.split("\n") if s.strip()]) == 8
    assert delete_lines(text, 0.2, seed=0) == kept
