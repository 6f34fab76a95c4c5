"""Tiny random open-MoE checkpoints for tests: a transformers model of each family saved with
``save_pretrained`` plus a small byte-level BPE tokenizer built here (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
    "The quick brown fox jumps over the lazy dog. Explain the code and find the bug.\n",
    "x = [1, 2, 3]\ny = {k: v for k, v in zip(x, x)}\n# comment: returns the sum\n",
] * 4

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                 "<|fim_suffix|>", "<|file_sep|>"]
QWEN_ADDED = ["<think>", "</think>"]  # Qwen3: added tokens that are not "special"
DS_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]
PLAIN_SPECIALS = ["<s>", "</s>"]

QWEN_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
DS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}{% else %}{{ m['content'] }}\n\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer(out: Path, style: str = "qwen", vocab_size: int = 360) -> int:
    """Write tokenizer.json + tokenizer_config.json into ``out``; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = {"qwen": QWEN_SPECIALS, "deepseek": DS_SPECIALS, "plain": PLAIN_SPECIALS}[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if style == "qwen":
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg: dict = {"qwen": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE},
                 "deepseek": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                              "chat_template": DS_TEMPLATE},
                 "plain": {"bos_token": "<s>", "eos_token": "</s>"}}[style]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return tok.get_vocab_size(with_added_tokens=True)


def import_transformers():
    """``transformers`` (>= 5.2x) depends on Hugging Face's hub package named ``kernels``,
    which our own ``kernels`` package shadows on sys.path: tell transformers the hub package
    is unavailable before any of its modelling code is imported."""
    import os

    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    import transformers.utils.import_utils as iu

    iu.is_kernels_available = lambda *a, **k: False
    import transformers.utils as tu

    tu.is_kernels_available = iu.is_kernels_available
    import transformers

    return transformers


FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3")
STYLE = {"qwen3_moe": "qwen", "mixtral": "plain", "olmoe": "plain", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek"}


def hf_config(family: str, vocab: int = 384):
    tf = import_transformers()

    base = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, initializer_range=0.1, tie_word_embeddings=False)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**base, head_dim=24, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                 num_experts_per_tok=2, norm_topk_prob=True, rope_theta=1e4)
    if family == "mixtral":
        return tf.MixtralConfig(**base, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    if family == "olmoe":
        return tf.OlmoeConfig(**base, intermediate_size=48, num_experts=8, num_experts_per_tok=2, clip_qkv=8.0,
                              pad_token_id=0, eos_token_id=1)
    base["num_key_value_heads"] = 4  # MLA: transformers expands the latent to every head
    mla = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=32,
               intermediate_size=96, first_k_dense_replace=1, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
               topk_group=2)
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    if family == "deepseek_v2":
        return tf.DeepseekV2Config(**base, **mla, n_routed_experts=8, q_lora_rank=None, topk_method="group_limited_greedy",
                                   routed_scaling_factor=1.5, rope_parameters=yarn)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(**base, **mla, n_routed_experts=8, q_lora_rank=24, routed_scaling_factor=2.5,
                                   rope_parameters=yarn)
    raise ValueError(family)


def make_checkpoint(family: str, out: Path, seed: int = 0, max_shard_size: str | None = None):
    """Save a tiny random ``family`` checkpoint with its tokenizer into ``out``; returns the HF model."""
    import torch

    tf = import_transformers()
    out = Path(out)
    build_tokenizer(out, STYLE[family])
    torch.manual_seed(seed)
    cfg = hf_config(family)
    cls = {"qwen3_moe": tf.Qwen3MoeForCausalLM, "mixtral": tf.MixtralForCausalLM, "olmoe": tf.OlmoeForCausalLM,
           "deepseek_v2": tf.DeepseekV2ForCausalLM, "deepseek_v3": tf.DeepseekV3ForCausalLM}[family]
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial norms
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return model


def load_tiny(family: str, out: Path):
    """A tiny random ``family`` checkpoint saved into ``out`` and loaded by moecoder, in float64
    (exact comparisons): ``(model, tokenizer)``."""
    from model.checkpoint import load_model

    make_checkpoint(family, out)
    loaded = load_model(out)
    return loaded.model.double().eval(), loaded.tokenizer
