"""Read packed token files written by ``moecoder data pack`` (see ``model.data.pack``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class PackedTokens:
    """One split of a packed directory: ``.tokens`` (a read-only memmap), ``.doc_offsets``
    (int64, docs + 1 entries), ``.meta`` (the parsed meta.json)."""

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        d = Path(directory)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{d} is not a packed-token directory (no meta.json)")
        try:
            self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{meta_path}: unreadable meta.json ({e})") from None
        if split not in self.meta.get("splits", {}):
            raise ValueError(f"{d}: no split {split!r} (has {', '.join(self.meta.get('splits', {})) or 'none'})")
        self.directory, self.split = d, split
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        bin_path, idx_path = d / f"{split}.bin", d / f"{split}.idx"
        if not bin_path.is_file() or not idx_path.is_file():
            raise ValueError(f"{d}: {split}.bin or {split}.idx is missing")
        size = bin_path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"{bin_path}: size {size} is not a multiple of {self.dtype.itemsize} ({self.meta['dtype']})")
        if size:
            self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)
        try:
            self.doc_offsets = np.load(idx_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{idx_path}: not a .npy index ({e})") from None
        if self.doc_offsets.ndim != 1 or len(self.doc_offsets) < 1 or int(self.doc_offsets[-1]) != len(self.tokens):
            raise ValueError(f"{idx_path}: offsets do not match {bin_path.name} ({len(self.tokens)} tokens)")

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int | None:
        return self.meta.get("eos_id")

    def __len__(self) -> int:
        """Number of documents."""
        return len(self.doc_offsets) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def doc(self, i: int, with_eos: bool = True) -> np.ndarray:
        """Tokens of document ``i`` (ending with eos unless ``with_eos=False``)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} docs)")
        i %= len(self)
        a, b = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
        return self.tokens[a : b if with_eos else b - 1]

    def __repr__(self) -> str:
        return f"PackedTokens({str(self.directory)!r}, {self.split!r}, docs={len(self)}, tokens={self.num_tokens})"
