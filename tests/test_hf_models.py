"""Open MoE checkpoints (model.hf): every family against transformers on tiny random models.

For each family a transformers model is saved with ``save_pretrained`` next to a small BPE
tokenizer built in tests/hf_tiny.py; moecoder loads the directory through
``model.checkpoint.load_model`` and must give the same logits (left-padded batch, fp32,
<= 1e-4) and the same 32 greedy tokens with its KV cache (token-by-token decode after a
chunked prefill). The Triton kernels are checked the same way in a subprocess under
``TRITON_INTERPRET=1``, so the interpreter flag never leaks into other test modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import FAMILIES, import_transformers, make_checkpoint  # noqa: E402

from model.checkpoint import CheckpointError, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_NEW = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is ~30x faster than oversubscribed threads on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    import_transformers()
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for fam in FAMILIES:
        d = root / fam
        out[fam] = (d, make_checkpoint(fam, d))
    return out


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :9] = 0
    return ids, mask


def _hf_logits(hf, ids, mask):
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def _hf_greedy(hf, prompt: list[int], n: int, vocab: int | None = None) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(input_ids=torch.tensor([ids])).logits[0, -1, :vocab].argmax()))
    return ids[len(prompt):]


def ours_greedy(model, prompt: list[int], n: int, chunk: int) -> list[int]:
    """Chunked prefill into the KV cache, then one token per step."""
    x = torch.tensor([prompt])
    cache = model.setup_cache(1, len(prompt) + n)
    with torch.no_grad():
        for a in range(0, len(prompt), chunk):
            logits = model(x[:, a:a + chunk], a, cache)
        out = [int(logits[0, -1].argmax())]
        for i in range(n - 1):
            logits = model(torch.tensor([[out[-1]]]), len(prompt) + i, cache)
            out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_greedy_match_transformers(ckpts, family):
    d, hf = ckpts[family]
    lm = load_model(d)
    assert lm.family == family
    ids, mask = _batch()
    ref = _hf_logits(hf, ids, mask)
    cache = lm.model.setup_cache(3, 32)
    cache.set_padding((mask == 0).sum(-1).tolist())
    with torch.no_grad():
        ours = lm.model(ids, 0, cache)
    real = mask.bool()
    assert (ref[real] - ours[real]).abs().max().item() <= 1e-4
    prompt = ids[0, :11].tolist()
    want = _hf_greedy(hf, prompt, N_NEW)
    assert ours_greedy(lm.model, prompt, N_NEW, chunk=4) == want
    assert ours_greedy(lm.model, prompt, N_NEW, chunk=64) == want


def test_generate_path_and_static_decode(ckpts):
    """model.generate (batched, left padded) and the CUDA-graph-ready static decode step."""
    from model.generate import SamplingParams, generate_batch

    for family in ("qwen3_moe", "deepseek_v3"):
        d, hf = ckpts[family]
        lm = load_model(d)
        prompts = [[5, 9, 20, 33, 41, 7], [12, 13, 14]]
        res = generate_batch(lm.model, lm.tokenizer, prompts, SamplingParams(max_new_tokens=12))
        for p, r in zip(prompts, res):
            want = _hf_greedy(hf, p, 12, vocab=lm.tokenizer.vocab_size)  # ids the tokenizer can decode
            got = r.token_ids
            assert got == want[:len(got)] and (len(got) == 12 or got[-1] in lm.tokenizer.stop_ids)
        # static decode (whole cache + mask, position as a tensor) == ordinary decode
        m = lm.model
        x = torch.tensor([prompts[0]])
        c1, c2 = m.setup_cache(1, 16), m.setup_cache(1, 16)
        with torch.no_grad():
            m(x, 0, c1)
            m(x, 0, c2)
            tok = torch.tensor([[3]])
            a = m(tok, x.shape[1], c1)
            b = m.decode_static(tok, torch.tensor([x.shape[1]]), c2)
        assert (a - b).abs().max().item() <= 1e-4


def test_compiled_pointwise_same_logits(ckpts):
    """layers.compile_pointwise (the GPU decode option) changes no numbers (traced with aot_eager here)."""
    from model.layers import compile_pointwise

    lm = load_model(ckpts["olmoe"][0])
    ids, _ = _batch()
    with torch.no_grad():
        a = lm.model(ids[:1, :8])
        try:
            compile_pointwise(True, backend="aot_eager")
            b = lm.model(ids[:1, :8])
        finally:
            compile_pointwise(False)
    assert (a - b).abs().max().item() <= 1e-5


_TRITON_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from model.checkpoint import load_model
import kernels
out = {}
for fam, d in json.loads(sys.argv[1]).items():
    lm = load_model(d)
    ref = torch.load(d + "/ref.pt")
    ids, mask = ref["ids"], ref["mask"]
    cache = lm.model.setup_cache(ids.shape[0], 32)
    cache.set_padding((mask == 0).sum(-1).tolist())
    with torch.no_grad():
        logits = lm.model(ids, 0, cache)
    real = mask.bool()
    sys.path.insert(0, "tests")
    from test_hf_models import ours_greedy
    greedy = ours_greedy(lm.model, ref["prompt"], len(ref["greedy"]), chunk=4) if ref["greedy"] else []
    out[fam] = {"diff": float((ref["logits"][real] - logits[real]).abs().max()), "greedy": greedy == ref["greedy"],
                "backend": kernels.backend(ids.float())}
print("RESULT " + json.dumps(out))
"""


def test_triton_interpreter_matches(ckpts):
    pytest.importorskip("triton")
    dirs = {}
    for family in FAMILIES:
        d, hf = ckpts[family]
        ids, mask = _batch()
        prompt = ids[0, :11].tolist()
        # the interpreter is slow: greedy decoding for one GQA and one MLA family, logits for all
        n = 12 if family in ("qwen3_moe", "deepseek_v3") else 0
        torch.save({"ids": ids, "mask": mask, "logits": _hf_logits(hf, ids, mask), "prompt": prompt,
                    "greedy": _hf_greedy(hf, prompt, n)}, d / "ref.pt")
        dirs[family] = str(d)
    env = {**os.environ, "MOECODER_KERNELS": "triton", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, json.dumps(dirs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    res = json.loads(lines[-1][7:])
    for family in FAMILIES:
        assert res[family]["backend"] == "triton"
        assert res[family]["diff"] <= 1e-4, (family, res[family])
        assert res[family]["greedy"], family


def test_sharded_checkpoint_with_index(tmp_path, ckpts):
    d = tmp_path / "sharded"
    hf = make_checkpoint("deepseek_v2", d, max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    lm = load_model(d)
    ids, mask = _batch()
    with torch.no_grad():
        assert (_hf_logits(hf, ids[:1], mask[:1]) - lm.model(ids[:1])).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype,tol", [("bf16", 0.02), ("int8", 0.03), ("int4", 0.4)])
def test_dtypes_at_load(ckpts, dtype, tol):
    """Mean |logit error| against transformers' fp32 (logits are O(1); the random weights
    are Gaussian, the worst case for 4-bit groups)."""
    d, hf = ckpts["qwen3_moe"]
    lm = load_model(d, dtype=dtype)
    ids, mask = _batch()
    with torch.no_grad():
        ref = _hf_logits(hf, ids[:1], mask[:1])
        ours = lm.model(ids[:1])
    assert (ref - ours).abs().mean().item() <= tol
    if dtype in ("int8", "int4"):
        experts = lm.model.layers[0].ffn.experts
        assert experts.w_gate_q.dtype == (torch.int8 if dtype == "int8" else torch.uint8)
        assert lm.model.layers[0].attn.wq.qweight.element_size() == 1


# ------------------------------------------------------------------------------- bad input
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _cli_error(d: Path, capsys) -> str:
    from model.generate import main

    capsys.readouterr()  # drop transformers' progress output
    assert main(["--model", str(d), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_missing_shard(tmp_path, capsys):
    d = tmp_path / "m"
    make_checkpoint("mixtral", d, max_shard_size="40KB")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert f"missing shard {shard.name}" in _cli_error(d, capsys)


def test_shape_mismatch(tmp_path, ckpts, capsys):
    d = _copy(ckpts["olmoe"][0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    assert "shape mismatch" in _cli_error(d, capsys)


def test_corrupt_file(tmp_path, ckpts, capsys):
    d = _copy(ckpts["qwen3_moe"][0], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = _cli_error(d, capsys)
    assert "model.safetensors" in err and "not a valid safetensors file" in err


def test_missing_tokenizer(tmp_path, ckpts, capsys):
    d = _copy(ckpts["qwen3_moe"][0], tmp_path / "m")
    (d / "tokenizer.json").unlink()
    assert "tokenizer missing" in _cli_error(d, capsys)


@pytest.mark.parametrize("edit,msg", [
    ({"architectures": ["GPTNeoXForCausalLM"]}, "unsupported architecture GPTNeoXForCausalLM"),
    ({"hidden_act": "gelu"}, "unsupported option hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "unsupported RoPE scaling 'longrope'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantised checkpoint (fp8)"),
])
def test_unsupported_config(tmp_path, ckpts, edit, msg):
    d = _copy(ckpts["deepseek_v3"][0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=None) as e:
        load_model(d)
    assert msg in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------- tokenizer
def test_tokenizer_interface(ckpts):
    from model.hf import HFTokenizer
    from model.tokenizer import StreamDecoder

    qwen = HFTokenizer.load(ckpts["qwen3_moe"][0])
    text = "def f(x):\n    return 'é→ü' + \"<|im_end|>\"\n"
    ids = qwen.encode(text)
    assert qwen.decode(ids) == text and qwen.count(text) == len(ids)
    assert qwen.special_id("eos") not in ids  # special-token text in code stays text
    sd = StreamDecoder(qwen)
    assert "".join(sd.push(i) for i in ids) + sd.flush() == text
    assert qwen.has_fim and not qwen.fim_spm and qwen.special_id("fim_prefix") == qwen.tok.token_to_id("<|fim_prefix|>")
    assert qwen.special_id("think_end") == qwen.tok.token_to_id("</think>")
    assert qwen.decode([qwen.special_id("think"), 40]) == qwen.decode([40])  # role markers decode to ""
    im_end = qwen.tok.token_to_id("<|im_end|>")
    assert qwen.eos_id == im_end and im_end in qwen.stop_ids and qwen.decode([im_end]) == ""
    rendered = qwen.render_chat([{"role": "user", "content": "hi"}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert qwen.encode_with_specials("<|im_start|>")[0] == qwen.tok.token_to_id("<|im_start|>")
    ds = HFTokenizer.load(ckpts["deepseek_v2"][0])
    assert ds.has_fim and ds.special_id("fim_suffix") == ds.tok.token_to_id("<｜fim▁hole｜>")
    assert ds.render_chat([{"role": "user", "content": "hi"}]).startswith("<｜begin▁of▁sentence｜>User: hi")
    plain = HFTokenizer.load(ckpts["mixtral"][0])
    assert not plain.has_fim and plain.chat_template is None
    with pytest.raises(KeyError):
        plain.special_id("fim_prefix")
