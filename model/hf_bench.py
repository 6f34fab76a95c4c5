"""Open-checkpoint benchmark: moecoder's model code + kernels against transformers on the
same random weights, side by side in one run.

    python -m model.hf_bench                    # full-size Qwen3-30B-A3B and DeepSeek-V2-Lite (GPU)
    python -m model.hf_bench --tiny --device cpu  # the same script on tiny configs (debugging)

For each configuration: transformers builds the model with random bf16 weights on the
device (nothing is downloaded) and is measured (prefill of a 2k, an 8k and a 2,049-token prompt, decode at
batch 1, 8, 64 with its DynamicCache, logits of a fixed batch); its weights are then copied
through moecoder's loader mapping (``model.hf.loader.fill``, the code that reads
safetensors shards) into our Transformer (transformers' copy parked in host memory meanwhile,
so that the GPU holds one copy at a time) and transformers' copy is freed; moecoder is
measured the same way (decode: static KV cache, one CUDA graph per batch size replayed per
step, as gpt-fast does; eager too) and its logits are compared with transformers'.

HBM floor: bytes a decode step must read (every non-expert weight except the embedding
table, the shared experts, the expected number of distinct routed experts for the batch
under uniform routing, E * (1 - (1 - k/E)^B) per layer, and the KV cache) divided by the
measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

import torch

from model.generate import prefill_chunk
from model.static_decode import StaticDecoder, cache_len

# prompt lengths of the prefill measurements: 2k and 8k (the issue's), and 2k + 1, the worst case of
# the product's bucketed prefill graphs (padded to the next bucket, 2560: model/static_decode.py)
PREFILLS = ("2k", "8k", "2k+1")

QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
    rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=False, hidden_act="silu",
)
DEEPSEEK_V2_LITE = dict(
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, moe_intermediate_size=1408, n_routed_experts=64,
    num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, intermediate_size=10944,
    topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
    rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840, tie_word_embeddings=False,
    hidden_act="silu", rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
)
CONFIGS = {"qwen3-30b-a3b": QWEN3_30B_A3B, "deepseek-v2-lite": DEEPSEEK_V2_LITE}
TINY = {
    "qwen3-30b-a3b": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                          num_experts=8, num_experts_per_tok=2),
    "deepseek-v2-lite": dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=16, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                             n_shared_experts=1, intermediate_size=96),
}


def import_transformers():
    """transformers >= 5.2x depends on Hugging Face's hub package ``kernels``, which our own
    ``kernels`` shadows: tell transformers the hub package is unavailable first."""
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    import transformers.utils.import_utils as iu

    iu.is_kernels_available = lambda *a, **k: False
    import transformers.utils as tu

    tu.is_kernels_available = iu.is_kernels_available
    import transformers

    return transformers


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, dev, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(dev, nbytes: int) -> float:
    """Device-to-device copy bandwidth, bytes/s (read + write counted)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * nbytes / _timeit(lambda: y.copy_(x), dev, 5)


def floor_bytes(cfg, batch: int, ctx: int, elt: int) -> float:
    """Bytes one decode step reads (see the module docstring)."""
    D, E, K, Fh = cfg.dim, cfg.n_experts, cfg.top_k, cfg.expert_hidden
    if cfg.attn_type == "mla":
        H = cfg.n_heads
        q = D * H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        attn = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (
            cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D
        kv_tok = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        hd = cfg.head_dim
        attn = D * cfg.n_heads * hd * 2 + D * cfg.n_kv_heads * hd * 2
        kv_tok = 2 * cfg.n_kv_heads * hd
    distinct = E * (1 - (1 - K / E) ** batch)
    total = cfg.n_layers * attn * elt + cfg.n_dense_layers * 3 * D * cfg.dense_hidden * elt
    total += cfg.n_moe_layers * (D * E * 4 + (distinct + cfg.n_shared_experts) * 3 * D * Fh * elt)  # fp32 router
    total += cfg.vocab_size * D * elt  # the output head
    total += cfg.n_layers * batch * ctx * kv_tok * elt  # the KV cache
    return float(total)


def bench_transformers(tf, hf_cfg: dict, dev, dtype, prompts: dict, batches, n_decode: int, reps: int, res: dict):
    cfg_cls = tf.AutoConfig.for_model(hf_cfg["model_type"], **{k: v for k, v in hf_cfg.items() if k != "model_type"})
    cfg_cls._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        hf = tf.AutoModelForCausalLM.from_config(cfg_cls, dtype=dtype).eval()
    with torch.no_grad():  # random weights of a sane scale (the init's std is 0.02 already)
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
    _sync(dev)
    res["transformers"]["build_s"] = round(time.perf_counter() - t0, 1)
    out = res["transformers"]
    with torch.inference_mode():
        ref = hf(input_ids=prompts["check"]).logits.float().cpu()
        for name in (n for n in PREFILLS if n in prompts):  # the ones asked for (--prefills)
            x = prompts[name]
            t = _timeit(lambda x=x: hf(input_ids=x, use_cache=True, logits_to_keep=1), dev, reps)
            out[f"prefill_{name}_tok_s"] = round(x.numel() / t, 1)
        for b in batches:
            x = prompts["decode"][:b]
            cache = tf.DynamicCache(config=hf.config)
            o = hf(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = o.logits[:, -1:].argmax(-1)
            for _ in range(2):
                o = hf(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = o.logits[:, -1:].argmax(-1)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(n_decode):
                o = hf(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = o.logits[:, -1:].argmax(-1)
            _sync(dev)
            out[f"decode_b{b}_tok_s"] = round(b * n_decode / (time.perf_counter() - t0), 1)
            del cache, o
    return hf, ref


def to_moecoder(hf, hf_cfg: dict, dev, dtype_name: str):
    from model.hf.families import family_from_config
    from model.hf.loader import empty_model, fill

    fam = family_from_config(hf_cfg, max_context=16384)
    model, logical = empty_model(fam, dev, dtype_name)
    with torch.no_grad():
        fill(model, fam, logical, hf.state_dict().items(), where="transformers model")
    return model.eval(), fam


def random_moecoder(name: str, dev, layers: int | None = None, max_context: int = 16384):
    """Our Transformer for ``CONFIGS[name]`` (``layers`` of them, default all) with random bf16
    weights made on ``dev`` (no transformers involved): for measurements of our path alone."""
    from model.hf.families import family_from_config
    from model.hf.loader import empty_model

    cfg = dict(CONFIGS[name], **({"num_hidden_layers": layers} if layers else {}))
    model, _ = empty_model(family_from_config(cfg, max_context=max_context), dev, "bf16")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        for moe in model.moe_layers():
            moe.expert_bias.zero_()
    return model.eval()


def bench_moecoder(model, prompts, dev, batches, n_decode: int, reps: int, res: dict, compiled: bool = False):
    out = res["moecoder"]
    with torch.inference_mode():
        ours = model(prompts["check"]).float().cpu()
        for name in (n for n in PREFILLS if n in prompts):
            x = prompts[name]

            def run(x=x):  # one eager forward over a fresh cache
                cache = model.setup_cache(x.shape[0], x.shape[1], device=dev)
                return model(x, 0, cache, last_only=True)

            t = _timeit(run, dev, reps)
            out[f"prefill_{name}_eager_tok_s"] = round(x.numel() / t, 1)
            if dev.type != "cuda":
                out[f"prefill_{name}_tok_s"] = out[f"prefill_{name}_eager_tok_s"]
                continue
            # the product's prefill (model/generate.py): chunks of prefill_chunk(), the first one
            # replayed from a captured graph of its bucket (model/static_decode.py)
            # the product's cache: a power-of-two length with room for what the prompt generates
            dec = StaticDecoder(model, x.shape[0], cache_len(x.shape[1] + 1, model.cfg.max_seq_len), False, dev)

            def product(x=x, dec=dec, chunk=prefill_chunk(dev)):
                for a in range(0, x.shape[1], chunk):
                    logits = dec.prefill(model, x[:, a:a + chunk], a)
                return logits

            t0 = time.perf_counter()
            first = product().clone()  # warm-up + capture
            _sync(dev)
            out[f"prefill_{name}_capture_s"] = round(time.perf_counter() - t0, 2)
            t = _timeit(product, dev, reps)
            out[f"prefill_{name}_tok_s"] = round(x.numel() / t, 1)
            out[f"prefill_{name}_graph_vs_eager_max_abs_diff"] = round(float((first - run()).abs().max()), 4)
            del dec
        ctx = prompts["decode"].shape[1]
        modes = ["eager"] + (["graph"] if dev.type == "cuda" else []) + (["graphc"] if compiled and dev.type == "cuda" else [])
        for mode in modes:
            if mode == "graphc":
                from model.layers import compile_pointwise

                try:
                    probe = prompts["check"][:1, :32]
                    before = model(probe)
                    compile_pointwise(True)
                    out["compiled_vs_eager_max_abs_diff"] = round(float((model(probe) - before).abs().max()), 5)
                except Exception as e:  # noqa: BLE001
                    compile_pointwise(False)
                    out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    continue
            for b in batches:
                # the product's decoder (model/static_decode.py): static cache, graph unless eager
                dec = StaticDecoder(model, b, ctx + n_decode + 8, False, dev, graph=mode != "eager")
                state = {"tok": model(prompts["decode"][:b], 0, dec.cache, last_only=True)[:, -1].argmax(-1),
                         "pos": ctx}

                def step(dec=dec, state=state):
                    state["tok"] = dec.step(model, state["tok"], state["pos"]).argmax(-1)
                    state["pos"] += 1

                try:
                    for _ in range(2):  # the first graph step captures
                        step()
                except Exception as e:  # noqa: BLE001 - reported, the eager number stands
                    out[f"decode_b{b}_{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    continue
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(n_decode):
                    step()
                _sync(dev)
                out[f"decode_b{b}_{mode}_tok_s"] = round(b * n_decode / (time.perf_counter() - t0), 1)
                print(f"  decode b{b} {mode}: {out[f'decode_b{b}_{mode}_tok_s']} tok/s", flush=True)
                del dec
    return ours


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.hf_bench", description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs (debug the script on a CPU)")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--prefills", default=",".join(PREFILLS),
                   help="prefill measurements to take, of " + ", ".join(PREFILLS) + " ('' = none: decode only)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="also decode with RMSNorm/RoPE fused by torch.compile inside the CUDA graph")
    p.add_argument("--out", default=None, help="write the results (JSON) here after each configuration")
    args = p.parse_args(argv)
    wanted = tuple(x for x in args.prefills.split(",") if x)
    if any(x not in PREFILLS for x in wanted):
        p.error(f"--prefills takes names of {', '.join(PREFILLS)}; got {args.prefills!r}")
    lengths = dict(zip(PREFILLS, (64, 128, 65) if args.tiny else (2048, 8192, 2049)))
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    batches = [int(b) for b in args.batches.split(",")]
    tf = import_transformers()
    import kernels

    env = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
           "transformers": tf.__version__, "python": platform.python_version(), "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
           "dtype": dtype_name, "kernels_backend": kernels.backend(torch.zeros(1, device=dev))}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    results = {"env": env, "configs": {}}
    if dev.type == "cuda":
        env["copy_bandwidth_GBs"] = round(copy_bandwidth(dev, 1 << 31) / 1e9, 1)
    print(json.dumps(env), flush=True)
    for name in args.configs.split(","):
        hf_cfg = dict(CONFIGS[name])
        if args.tiny:
            hf_cfg.update(TINY[name])
        V = hf_cfg["vocab_size"]
        g = torch.Generator().manual_seed(0)
        lens = {k: lengths[k] for k in wanted}
        prompts = {k: torch.randint(0, V, (1, n), generator=g).to(dev) for k, n in lens.items()}
        prompts["check"] = torch.randint(0, V, (2, 128 if not args.tiny else 16), generator=g).to(dev)
        prompts["decode"] = torch.randint(0, V, (max(batches), 128 if not args.tiny else 8), generator=g).to(dev)
        res = {"transformers": {}, "moecoder": {}}
        results["configs"][name] = res
        try:
            run_config(name, hf_cfg, tf, dev, dtype, dtype_name, prompts, batches, args, env, res)
        except Exception as e:  # noqa: BLE001 - report and go on with the next configuration
            import traceback

            traceback.print_exc()
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            res["peak_GiB"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 1)
            torch.cuda.reset_peak_memory_stats(dev)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    print(render(results))
    return 0


def run_config(name, hf_cfg, tf, dev, dtype, dtype_name, prompts, batches, args, env, res) -> None:
    if True:
        t0 = time.perf_counter()
        hf, ref = bench_transformers(tf, hf_cfg, dev, dtype, prompts, batches, args.decode_steps, args.reps, res)
        print(name, "transformers", json.dumps(res["transformers"]), f"{time.perf_counter() - t0:.0f}s", flush=True)
        if dev.type == "cuda":
            # Park transformers' copy in host memory while ours is built, so that the peak is one
            # copy of the weights (Qwen3-30B-A3B then fits an 80 GB card); fill() copies to the GPU.
            t1 = time.perf_counter()
            hf.to("cpu")
            torch.cuda.empty_cache()
            res["reference_to_host_s"] = round(time.perf_counter() - t1, 1)
        model, fam = to_moecoder(hf, hf_cfg, dev, dtype_name)
        del hf
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        ours = bench_moecoder(model, prompts, dev, batches, args.decode_steps, args.reps, res, args.compile)
        diff = (ours - ref).abs()
        res["logits"] = {"max_abs_diff": round(float(diff.max()), 4), "mean_abs_diff": round(float(diff.mean()), 5),
                         "ref_abs_max": round(float(ref.abs().max()), 3),
                         "top1_agree": round(float((ours.argmax(-1) == ref.argmax(-1)).float().mean()), 4)}
        elt = 2 if dtype == torch.bfloat16 else 4
        ctx = prompts["decode"].shape[1] + args.decode_steps
        res["hbm_floor"] = {}
        for b in batches:
            nbytes = floor_bytes(fam.config, b, ctx, elt)
            entry = {"bytes_per_step_GB": round(nbytes / 1e9, 3)}
            if "copy_bandwidth_GBs" in env:
                entry["floor_tok_s"] = round(b * env["copy_bandwidth_GBs"] * 1e9 / nbytes, 1)
            res["hbm_floor"][f"b{b}"] = entry
        print(name, "moecoder", json.dumps(res["moecoder"]), json.dumps(res["logits"]),
              json.dumps(res["hbm_floor"]), f"{time.perf_counter() - t0:.0f}s", flush=True)
        del model


def render(results: dict) -> str:
    """A markdown table of the results."""
    lines = []
    bw = results["env"].get("copy_bandwidth_GBs")
    for name, r in results["configs"].items():
        if "logits" not in r:
            lines.append(f"\n**{name}**: incomplete ({r.get('error', '?')}); partial: {json.dumps(r)}")
            continue
        t, m, fl = r["transformers"], r["moecoder"], r.get("hbm_floor", {})
        lines.append(f"\n**{name}** (logits: max |diff| {r['logits']['max_abs_diff']} of |logit| <= "
                     f"{r['logits']['ref_abs_max']}, mean {r['logits']['mean_abs_diff']}, top-1 agreement "
                     f"{r['logits']['top1_agree']})\n")
        lines.append("| measure | transformers | moecoder | ratio | HBM floor |")
        lines.append("|---|---|---|---|---|")
        for n in PREFILLS:
            k = f"prefill_{n}_tok_s"
            if k not in t and k not in m:  # not measured (--prefills)
                continue
            a, b, e = t.get(k), m.get(k), m.get(f"prefill_{n}_eager_tok_s")
            how = f" (eager {e}: {e / a:.2f}x)" if e and a and e != b else ""
            lines.append(f"| {k} | {a} | {b}{how} | {b / a:.2f}x |  |" if a and b else f"| {k} | {a} | {b} | | |")
        for key in sorted({k for k in t if k.startswith("decode_b")}, key=lambda s: int(s.split("_")[1][1:])):
            b = key.split("_")[1]
            ours = m.get(f"decode_{b}_graphc_tok_s") or m.get(f"decode_{b}_graph_tok_s") or m.get(f"decode_{b}_eager_tok_s")
            how = "graph+compiled" if m.get(f"decode_{b}_graphc_tok_s") else (
                "graph" if m.get(f"decode_{b}_graph_tok_s") else "eager")
            if m.get(f"decode_{b}_graphc_tok_s"):
                how += f"; graph {m.get(f'decode_{b}_graph_tok_s')}"
            floor = fl.get(b, {}).get("floor_tok_s")
            ratio = f"{ours / t[key]:.2f}x" if ours and t[key] else ""
            fl_txt = f"{floor} ({ours / floor:.0%})" if floor and ours else ""
            lines.append(f"| decode {b} tok/s | {t[key]} | {ours} ({how}; eager {m.get(f'decode_{b}_eager_tok_s')}) "
                         f"| {ratio} | {fl_txt} |")
    if bw:
        lines.append(f"\ncopy bandwidth {bw} GB/s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
