"""Generation: cache-exact greedy decoding, sampling, stop handling, batching, FIM, CLI."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from model.checkpoint import export, load_model
from model.config import get_preset
from model.generate import (
    CancelToken,
    SamplingParams,
    _Text,
    fim,
    generate,
    generate_batch,
    main,
    sample,
    stream,
    token_logprobs,
)
from model.transformer import Transformer


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def prompt(loaded):
    return loaded.tokenizer.encode("def add(a, b):\n    return a")


def _naive_greedy(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


class _Tok:
    """Wraps the real tokenizer with another eos id."""

    def __init__(self, tok, eos_id):
        self._tok, self.eos_id = tok, eos_id

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_greedy_stream_matches_full_recompute(loaded, prompt):
    model, tok = loaded.model, loaded.tokenizer
    s = stream(model, tok, prompt, SamplingParams(max_new_tokens=12))
    events = list(s)
    res = s.result
    assert len(events) == 12 and res.finish_reason == "length"
    assert [e.token_id for e in events] == res.token_ids
    assert prompt + res.token_ids == _naive_greedy(model, prompt, 12)
    assert "".join(e.text for e in events) == res.text == tok.decode(res.token_ids)
    assert generate(model, tok, prompt, SamplingParams(max_new_tokens=12)).token_ids == res.token_ids


def test_logprobs_match_token_logprobs(loaded, prompt):
    model, tok = loaded.model, loaded.tokenizer
    res = generate(model, tok, prompt, SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))
    lp = token_logprobs(model, prompt + res.token_ids)
    assert lp[0] == 0.0 and len(lp) == len(prompt) + 8
    assert lp[-8:] == pytest.approx(res.logprobs, abs=1e-4)
    assert all(x < 0 for x in lp[1:])


@pytest.mark.parametrize("chunk", [512, 4])
def test_batch_with_padding_equals_single(loaded, prompt, chunk, monkeypatch):
    """Left padding + per-row positions; chunk=4 also prefills in chunks through the mask."""
    import model.generate as g

    monkeypatch.setattr(g, "PREFILL_CHUNK", chunk)
    model, tok = loaded.model, loaded.tokenizer
    prompts = [prompt, prompt[:3], prompt[2:], [tok.encode("x")[0]]]
    params = SamplingParams(max_new_tokens=10)
    batch = generate_batch(model, tok, prompts, params, batch_size=3)
    assert len(batch) == 4
    for p, r in zip(prompts, batch):
        single = generate(model, tok, p, params)
        assert r.token_ids == single.token_ids
        assert r.logprobs == pytest.approx(single.logprobs, abs=1e-4)
        assert r.text == single.text


def test_stop_token_eos_time_and_cancel(loaded, prompt):
    model, tok = loaded.model, loaded.tokenizer
    base = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)
    ref = generate(model, tok, prompt, base).token_ids
    k = ref.index(ref[3])  # first occurrence of the 4th token
    r = generate(model, tok, prompt, dataclasses.replace(base, stop_token_ids=(ref[k],)))
    assert r.finish_reason == "stop" and r.token_ids == ref[:k + 1]
    r = generate(model, _Tok(tok, ref[k]), prompt, base)
    assert r.finish_reason == "eos" and r.token_ids == ref[:k + 1]
    assert r.text == tok.decode(ref[:k])
    r = generate(model, tok, prompt, SamplingParams(max_new_tokens=6, max_seconds=0))
    assert r.finish_reason == "time" and len(r.token_ids) == 1
    cancel = CancelToken()
    s = stream(model, tok, prompt, SamplingParams(max_new_tokens=50), cancel)
    for i, _ in enumerate(s):
        if i == 2:
            cancel.cancel()
    assert cancel.cancelled and s.result.finish_reason == "cancelled" and len(s.result.token_ids) == 3
    r = generate(model, tok, prompt, SamplingParams(max_new_tokens=5), cancel)  # cancelled before it starts
    assert r.finish_reason == "cancelled" and r.token_ids == [] and r.text == ""


def test_stop_string_is_trimmed(loaded, prompt):
    model, tok = loaded.model, loaded.tokenizer
    full = generate(model, tok, prompt, SamplingParams(max_new_tokens=10)).text
    assert len(full) > 4
    stop = full[3:5]
    s = stream(model, tok, prompt, SamplingParams(max_new_tokens=10, stop_strings=(stop,)))
    deltas = [e.text for e in s]
    assert s.result.finish_reason == "stop"
    assert s.result.text == full[:full.find(stop)] == "".join(deltas)


class _ByteTok:
    eos_id = 0

    def __init__(self, pieces):
        self.pieces = pieces

    def decode_bytes(self, ids):
        return b"".join(self.pieces[i] for i in ids)


def test_text_state_utf8_and_hold_back():
    snake = "🐍".encode()
    tok = _ByteTok([b"", b"ab", snake[:2], snake[2:], b"\n", b"c", b"\n\nd"])
    t = _Text(tok, stops=("\n\n",))
    assert t.push(1) == ("ab", False)
    assert t.push(2) == ("", False)  # half a character is never emitted
    assert t.push(3) == ("🐍", False)
    assert t.push(4) == ("", False)  # could start "\n\n": held back
    assert t.push(5) == ("\nc", False)  # it did not
    assert t.push(6) == ("", True)  # "\n\nd": stop string found, trimmed
    assert t.text == "ab🐍\nc"
    t = _Text(tok, stops=("\n\n",))
    t.push(1), t.push(4)
    assert t.flush() == "\n" and t.text == "ab\n"


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    assert int(sample(logits, SamplingParams())) == 1
    assert int(sample(logits, SamplingParams(temperature=1.0, top_k=1), g)) == 1
    draws = {int(sample(logits, SamplingParams(temperature=5.0, top_k=2), g)) for _ in range(200)}
    assert draws == {1, 2}
    draws = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.4), g)) for _ in range(200)}
    assert draws == {1}
    draws = {int(sample(logits, SamplingParams(temperature=1.0, top_p=0.95), g)) for _ in range(300)}
    assert draws == {1, 2, 4}


def test_seeded_sampling_is_reproducible(loaded, prompt):
    model, tok = loaded.model, loaded.tokenizer
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7)
    assert generate(model, tok, prompt, p).token_ids == generate(model, tok, prompt, p).token_ids


def test_bad_requests(loaded, prompt):
    model, tok = loaded.model, loaded.tokenizer
    with pytest.raises(ValueError, match="context length"):
        generate(model, tok, [5] * 300, SamplingParams())
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, prompt, SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, tok, [], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        stream(model, tok, prompt, SamplingParams(top_p=0))  # at the call, not at the first next()


def test_fim_prompt_and_stops(loaded):
    model, tok = loaded.model, loaded.tokenizer
    r = fim(model, tok, "def f(x):\n    return ", "\n", SamplingParams(max_new_tokens=5))
    assert r.finish_reason in ("eos", "stop", "length")
    fim_ids = {tok.special_id(n) for n in ("fim_prefix", "fim_suffix", "fim_middle", "file_sep")}
    assert all(t not in fim_ids for t in r.token_ids[:-1])


# ---------------------------------------------------------------- CLI
def test_cli_generates(tiny_model_dir, capsys):
    rc = main(["--model", str(tiny_model_dir), "--prompt", "def f(", "--max-new-tokens", "5"])
    out = capsys.readouterr()
    assert rc == 0 and len(out.out) > 0 and out.err == ""


@pytest.mark.parametrize("argv, msg", [
    (["--model", "/nonexistent/dir", "--prompt", "x"], "model directory not found"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens"),
    (["--prompt", "x", "--top-p", "2"], "top_p"),
])
def test_cli_bad_input(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_ctrl_c_stops_cleanly(tmp_path, tiny_tokenizer_path):
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny"), max_seq_len=8192)
    export(Transformer(cfg), cfg, tiny_tokenizer_path, tmp_path / "m")
    cmd = [sys.executable, "-m", "assistant.cli", "generate", "--model", str(tmp_path / "m"),
           "--prompt", "def", "--max-new-tokens", "8000"]  # greedy: no early eos
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIGINT back to its default in the child: pytest run as a background job ignores it, and an
    # ignored signal is inherited (the Ctrl-C below would never arrive)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = proc.stdout.read(1)  # streaming has started
        assert first
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"interrupted" in err


# ---------------------------------------------------------------- static decode (the CUDA-graph path)
def test_static_decode_path_matches_eager(loaded, prompt, monkeypatch):
    """MOECODER_CUDA_GRAPH=1 on the CPU runs the graph path's plumbing eagerly: a bucketed static
    cache reused across generations (stale slots from the previous one must stay hidden), left
    padding through its static pad tensor, and a second generation running while the first is
    unfinished (it must not share the first one's cache). The prompts' prefill goes through the
    bucketed static prefill: right-padded to a bucket, head at the last real token."""
    from model import static_decode

    model, tok = loaded.model, loaded.tokenizer
    params = SamplingParams(max_new_tokens=9)
    prompts = [prompt, prompt[:3], prompt[2:], [tok.encode("x")[0]]]
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "0")
    want_single = [generate(model, tok, p, params) for p in prompts]
    want_batch = generate_batch(model, tok, prompts, params, batch_size=4)
    assert "_static_decoders" not in model.__dict__

    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "1")
    monkeypatch.setattr(static_decode, "MIN_LEN", 8)  # small buckets: the shorter prompts fit the first's cache
    monkeypatch.setattr(static_decode, "PREFILL_BUCKETS", (2, 4, 6, 8, 12, 16, 24, 32))  # pads most prompts
    for p, w in zip(prompts, want_single):  # one decoder (batch 1), reused 4 times
        got = generate(model, tok, p, params)
        assert got.token_ids == w.token_ids and got.text == w.text
        assert got.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    pool = model.__dict__["_static_decoders"]
    L = static_decode.cache_len(len(prompt) + 9, model.cfg.max_seq_len)
    assert [k[3:] for k in pool] == [(1, L, False)]
    buckets = {static_decode.prefill_bucket(len(p), L) for p in prompts}
    assert set(pool[next(iter(pool))].prefills) == buckets - {None} and len(buckets - {None}) >= 2
    got = generate_batch(model, tok, prompts, params, batch_size=4)
    for r, w in zip(got, want_batch):
        assert r.token_ids == w.token_ids and r.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    assert (4, L, True) in [k[3:] for k in pool] and len(pool) <= static_decode.KEEP

    a, b = stream(model, tok, prompts[0], params), stream(model, tok, prompts[2], params)
    ea = [next(a) for _ in range(4)]  # a holds the batch-1 decoder now
    eb = list(b)  # b runs while a is unfinished: its own (eager) cache
    ea += list(a)
    for events, w in ((ea, want_single[0]), (eb, want_single[2])):
        assert [e.token_id for e in events] == w.token_ids
        assert [e.logprob for e in events] == pytest.approx(w.logprobs, abs=1e-4)
    assert not any(d.busy for d in pool.values())


def test_static_decode_mode_is_checked(monkeypatch):
    from model import static_decode

    assert [static_decode.cache_len(n, 32768) for n in (1, 1024, 1025, 5000)] == [1024, 1024, 2048, 8192]
    assert static_decode.cache_len(5000, 4096) == 4096

    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "yes")
    with pytest.raises(ValueError, match="MOECODER_CUDA_GRAPH"):
        static_decode.wanted(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs")
def test_cuda_graph_generation_matches_eager(loaded, prompt, monkeypatch):
    import copy

    model = copy.deepcopy(loaded.model).cuda()
    tok = loaded.tokenizer
    params = SamplingParams(max_new_tokens=12)
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "0")
    want = [generate(model, tok, p, params).token_ids for p in (prompt, prompt[:4])]
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "auto")
    got = [generate(model, tok, p, params).token_ids for p in (prompt, prompt[:4])]
    assert got == want
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "0")
    want_b = [r.token_ids for r in generate_batch(model, tok, [prompt, prompt[:4]], params, batch_size=2)]
    monkeypatch.setenv("MOECODER_CUDA_GRAPH", "auto")
    got_b = [r.token_ids for r in generate_batch(model, tok, [prompt, prompt[:4]], params, batch_size=2)]
    assert got_b == want_b  # left padding inside a right-padded prefill bucket
    decs = model.__dict__["_static_decoders"].values()
    assert all(d.graph is not None for d in decs)
    assert all(d.prefills and all(e[0] is not None for e in d.prefills.values()) for d in decs)


def test_prefill_chunk_by_device_and_override(monkeypatch):
    """512 prompt tokens per forward on the CPU, 8192 on a GPU (whose chunks cost launches, not
    memory), MOECODER_PREFILL_CHUNK over both; a bad value is an error, not a silent default."""
    from model.generate import prefill_chunk

    monkeypatch.delenv("MOECODER_PREFILL_CHUNK", raising=False)
    assert prefill_chunk("cpu") == 512 and prefill_chunk(torch.device("cuda", 0)) == 8192
    monkeypatch.setenv("MOECODER_PREFILL_CHUNK", "64")
    assert prefill_chunk("cpu") == 64 == prefill_chunk("cuda")
    monkeypatch.setenv("MOECODER_PREFILL_CHUNK", "0")
    with pytest.raises(ValueError, match="MOECODER_PREFILL_CHUNK"):
        prefill_chunk("cpu")


def test_failed_prefill_capture_falls_back_to_eager(loaded, prompt, monkeypatch, capsys):
    """A prefill graph that cannot be captured is reported once on stderr; that bucket then
    prefills eagerly (unpadded) with the same logits, and later prompts of the bucket do too."""
    from model import static_decode

    model = loaded.model
    calls = []

    def failing(self, model, tok, last):
        calls.append(tok.shape[1])
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(static_decode.StaticDecoder, "_record_prefill", failing)
    monkeypatch.setattr(static_decode, "PREFILL_BUCKETS", (16, 32, 64))  # both prompts: one bucket
    assert len(prompt) <= 16
    dec = static_decode.StaticDecoder(model, 1, 64, False, torch.device("cpu"), graph=True)
    for ids in (prompt, prompt[:3]):
        x = torch.tensor([ids])
        with torch.no_grad():
            want = model(x, 0, model.setup_cache(1, 64), last_only=True)
            got = dec.prefill(model, x, 0)
        assert torch.allclose(got, want, atol=1e-5)
    assert calls == [16]  # tried once for the bucket, not per prompt
    err = capsys.readouterr().err
    assert err.count("prefill CUDA graph") == 1 and "operation not permitted when stream is capturing" in err
