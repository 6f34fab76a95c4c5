"""Open MoE checkpoints in Hugging Face layout, run by our own model code and kernels.

``load_hf(dir, device, dtype)`` -> (Transformer, HFTokenizer, Family); ``is_hf_dir(dir)``.
``model.checkpoint.load_model`` calls these for a directory whose config.json names
``architectures``, so callers hold one kind of loaded model for both tiers.
See docs/models.md.
"""

from __future__ import annotations

from model.hf.families import ARCHITECTURES, Family, HFError, family_from_config
from model.hf.loader import is_hf_dir, load_hf_model
from model.hf.tokenizer import HFTokenizer

__all__ = ["ARCHITECTURES", "Family", "HFError", "HFTokenizer", "family_from_config", "is_hf_dir", "load_hf",
           "load_hf_model"]


def load_hf(model_dir, device="cpu", dtype: str = "fp32", max_context: int | None = None, progress=None):
    """(model, tokenizer, family) of a checkpoint directory; HFError (one line) on any problem."""
    from pathlib import Path

    tok_path = Path(model_dir) / "tokenizer.json"
    if Path(model_dir).is_dir() and (Path(model_dir) / "config.json").is_file() and not tok_path.is_file():
        raise HFError(f"tokenizer missing: {tok_path}")  # before reading gigabytes of weights
    model, fam = load_hf_model(model_dir, device, dtype, max_context, progress)
    tok = HFTokenizer.load(model_dir)
    return model, tok, fam
