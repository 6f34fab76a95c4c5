"""A checkpoint's own tokenizer (``tokenizer.json`` through the ``tokenizers`` library)
behind the interface of :class:`model.tokenizer.Tokenizer`: ``encode`` (special-token text
in the input is encoded as plain text, never as a control token), ``decode``,
``decode_bytes`` (a per-id byte table, so streaming never splits a UTF-8 character), ``count``,
``vocab_size``, ``eos_id``, ``pad_id``, ``special_id(name)``, ``is_special``, ``id_to_piece``.

Family knowledge on top:

* FIM tokens: Qwen/StarCoder ``<|fim_prefix|>``/``<|fim_suffix|>``/``<|fim_middle|>`` (or
  ``<fim_prefix>``...), DeepSeek-Coder ``<｜fim▁begin｜>``/``<｜fim▁hole｜>``/``<｜fim▁end｜>``.
  Both are prompted prefix-suffix-middle (``fim_spm`` False). ``has_fim`` False: the
  context manager completes from the prefix only.
* ``think``/``think_end``: ``<think>``/``</think>`` when the vocabulary has them (Qwen3).
* ``stop_ids``: every end-of-turn / end-of-text id (generation_config.json's eos list,
  ``<|im_end|>``, ``<|endoftext|>``, ``<｜end▁of▁sentence｜>``).
* ``chat_template``: the checkpoint's own jinja template (``tokenizer_config.json`` or
  ``chat_template.jinja``), rendered by :meth:`render_chat`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from model.hf.families import HFError

_FIM = [
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5/3-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder
]
_STOP_TEXT = ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|eot_id|>", "</s>", "<|end_of_text|>")
_FILE_SEP = ("<|file_sep|>", "<file_sep>")


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise HFError(f"{path}: invalid JSON") from None
    return data if isinstance(data, dict) else {}


def _token_text(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer:
    def __init__(self, tok, path: Path, tok_config: dict | None = None, gen_config: dict | None = None,
                 chat_template: str | None = None):
        self.tok, self.path = tok, path
        self.config = tok_config or {}
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)
        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab = vocab
        added = tok.get_added_tokens_decoder()  # id -> AddedToken
        self._specials = frozenset(i for i, a in added.items() if a.special)
        self._table = self._byte_table(tok, added)

        def tid(text: str | None) -> int | None:
            return vocab.get(text) if text else None

        eos = tid(_token_text(self.config.get("eos_token")))
        gen_eos = (gen_config or {}).get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else [i for i in (gen_eos or []) if isinstance(i, int)]
        if eos is None and gen_eos:
            eos = gen_eos[0]
        stops = {i for i in [eos, *gen_eos, *(tid(t) for t in _STOP_TEXT)] if i is not None}
        if eos is None:
            eos = min(stops) if stops else None
        if eos is None:
            raise HFError(f"{path}: no end-of-text token (eos_token in tokenizer_config.json)")
        self.eos_id: int = eos
        self.stop_ids: tuple[int, ...] = tuple(sorted(stops))
        # padding rows are masked from attention; no id is reserved for them (see model.generate)
        self.pad_id: int = -1
        bos = tid(_token_text(self.config.get("bos_token")))
        self.bos_id: int | None = bos
        self._special: dict[str, int] = {"eos": eos}
        for names in _FIM:
            ids = [tid(n) for n in names]
            if all(i is not None for i in ids):
                self._special.update(zip(("fim_prefix", "fim_suffix", "fim_middle"), ids))
                break
        for text in _FILE_SEP:
            if tid(text) is not None:
                self._special["file_sep"] = tid(text)
                break
        if tid("<think>") is not None and tid("</think>") is not None:
            self._special["think"], self._special["think_end"] = tid("<think>"), tid("</think>")
            # role markers, like our own <|think|>: they split reasoning from answer, never text
            self._table[self._special["think"]] = self._table[self._special["think_end"]] = b""
        self.has_fim = "fim_prefix" in self._special
        self.fim_spm = False  # open code models are prompted prefix-suffix-middle
        self.chat_template = chat_template
        self._compiled = None
        self._plain = None

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        d = Path(model_dir)
        p = d / "tokenizer.json"
        if not p.is_file():
            raise HFError(f"tokenizer missing: {p}")
        try:
            tok = _Tok.from_file(str(p))
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception
            raise HFError(f"{p}: not a tokenizers file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        cfg = _read_json(d / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = d / "chat_template.jinja"
        if not template and jinja.is_file():
            template = jinja.read_text()
        return cls(tok, p, cfg, _read_json(d / "generation_config.json"), template or None)

    @staticmethod
    def _byte_table(tok, added) -> list[bytes]:
        n = tok.get_vocab_size(with_added_tokens=True)
        dec = json.loads(tok.to_str()).get("decoder") or {}
        kinds = {dec.get("type")} | {x.get("type") for x in dec.get("decoders", []) if isinstance(x, dict)}
        byte_level = "ByteLevel" in kinds
        b2u = _bytes_to_unicode()
        table: list[bytes] = []
        for i in range(n):
            a = added.get(i)
            if a is not None:
                table.append(b"" if a.special else a.content.encode("utf-8"))
                continue
            piece = tok.id_to_token(i)
            if piece is None:
                table.append(b"")
            elif byte_level:
                table.append(bytes(b2u[c] for c in piece if c in b2u))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    # -- encoding / decoding ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self._plain is None:  # a second instance that encodes "<|im_end|>" in user code as text
            from tokenizers import Tokenizer as _Tok

            plain = _Tok.from_str(self.tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_specials(self, text: str) -> list[int]:
        """Encode a rendered template: special-token text becomes the special ids."""
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def encode_batch(self, texts) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._table
        try:
            return b"".join(table[int(i)] for i in ids)
        except IndexError:
            bad = [int(i) for i in ids if not 0 <= int(i) < len(table)]
            raise ValueError(f"token id out of range 0..{len(table) - 1}: {bad[0]}") from None

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def special_id(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise KeyError(f"this checkpoint's tokenizer has no {name!r} token") from None

    def has_special(self, name: str) -> bool:
        return name in self._special

    def is_special(self, i: int) -> bool:
        return int(i) in self._specials

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(int(i)) or ""

    # -- chat ------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """The checkpoint's chat template applied to ``messages`` (jinja2, sandboxed)."""
        if not self.chat_template:
            raise HFError(f"{self.path.parent}: no chat_template in tokenizer_config.json")
        if self._compiled is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise HFError(f"chat template: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            self._compiled = env.from_string(self.chat_template)
        specials = {k: _token_text(self.config.get(k)) or "" for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **specials, **extra)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
