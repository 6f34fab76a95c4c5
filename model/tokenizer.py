"""The model's tokenizer: sentencepiece BPE, byte-exact on any UTF-8 text.

The sentencepiece model is trained with identity normalisation, no dummy prefix, no
whitespace folding and byte fallback, so every UTF-8 string has an encoding. Two things
sentencepiece itself would get wrong are handled here:

* the ``▁`` character (U+2581) is sentencepiece's own stand-in for a space, so a literal
  ``▁`` in the text is always encoded as its three byte pieces (never as a merged piece),
  and decoding maps ``▁`` inside ordinary pieces back to a space;
* decoding goes through a per-id byte table (``id_to_piece`` + byte pieces) rather than
  ``DecodeIds``, so the output is exactly the input bytes.

Special tokens (``model.formats.SPECIAL_TOKENS``) are sentencepiece control symbols:
encoding text never produces them; they decode to ``""``. ``pad`` is id 0, ``eos`` id 1.
"""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from model.formats import SPECIAL_TOKENS

SPACE_MARK = "\u2581"  # sentencepiece's whitespace symbol "▁"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
UNK_PIECE = "<unk>"

# Fixed ids: pad 0, eos 1, unk 2, then the other specials in SPECIAL_TOKENS order.
_CONTROL_NAMES = [n for n in SPECIAL_TOKENS if n not in ("pad", "eos")]


class TokenizerError(ValueError):
    """A tokenizer file that is missing or not a usable sentencepiece model."""


class Tokenizer:
    """Wraps a sentencepiece model; see the module docstring for the guarantees."""

    def __init__(self, sp, path: Path | None = None):
        self.sp = sp
        self.path = path
        self.vocab_size: int = sp.get_piece_size()
        self._special: dict[str, int] = {}
        for name, piece in SPECIAL_TOKENS.items():
            i = sp.piece_to_id(piece)
            if sp.id_to_piece(i) != piece:
                raise TokenizerError(f"tokenizer {path}: special token {piece!r} ({name}) is missing")
            self._special[name] = i
        self.pad_id = self._special["pad"]
        self.eos_id = self._special["eos"]
        table: list[bytes] = []
        byte_ids: dict[int, int] = {}
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                m = _BYTE_PIECE.match(piece)
                b = int(m.group(1), 16)
                table.append(bytes([b]))
                byte_ids[b] = i
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                table.append(b"")
            else:
                table.append(piece.replace(SPACE_MARK, " ").encode("utf-8"))
        if len(byte_ids) != 256:
            raise TokenizerError(f"tokenizer {path}: not trained with byte_fallback (needed for byte-exact text)")
        self._table = table
        self._mark_ids = [byte_ids[b] for b in SPACE_MARK.encode("utf-8")]
        self._specials_set = frozenset(self._special.values())

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``.model`` file, or a directory holding ``tokenizer.model``."""
        import sentencepiece as spm

        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.model"
        if not p.is_file():
            raise TokenizerError(f"tokenizer not found: {p}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(p))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"not a sentencepiece model: {p} ({str(e).splitlines()[0] if str(e) else e})") from None
        return cls(sp, p)

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no specials added). ``decode(encode(t)) == t`` for any str."""
        if not text:
            return []
        if SPACE_MARK not in text:
            return self.sp.encode(text)
        out: list[int] = []
        parts = text.split(SPACE_MARK)
        for k, part in enumerate(parts):
            if k:
                out.extend(self._mark_ids)
            if part:
                out.extend(self.sp.encode(part))
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not any(SPACE_MARK in t for t in texts):
            return self.sp.encode(list(texts))
        return [self.encode(t) for t in texts]

    def count(self, text: str) -> int:
        """Number of tokens ``text`` encodes to (for context-window budgets)."""
        return len(self.encode(text))

    # -- decoding ----------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of ``ids`` (specials are empty). May end inside a UTF-8 character;
        for streaming text use :class:`StreamDecoder`, which never emits half a character."""
        table = self._table
        try:
            return b"".join(table[int(i)] for i in ids)
        except IndexError:
            bad = [int(i) for i in ids if not 0 <= int(i) < self.vocab_size]
            raise ValueError(f"token id out of range 0..{self.vocab_size - 1}: {bad[0]}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; specials decode to ""; invalid UTF-8 (only possible for ids no
        encoding produced) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def special_id(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def is_special(self, i: int) -> bool:
        return i in self._specials_set

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental decoding for streaming: ``push(id)`` returns only whole characters."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self._tok._table[int(token_id)])

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


# -- training ------------------------------------------------------------------------------


def chunk_text(text: str, chunk_chars: int = 4096) -> Iterator[str]:
    """Split text into chunks of about ``chunk_chars`` at line ends, keeping the newlines."""
    if len(text) <= chunk_chars:
        if text:
            yield text
        return
    start = 0
    n = len(text)
    while start < n:
        end = min(start + chunk_chars, n)
        if end < n:
            nl = text.rfind("\n", start, end)
            if nl > start:
                end = nl + 1
        yield text[start:end]
        start = end


def _iter_training_texts(files_or_texts: Iterable) -> Iterator[str]:
    for item in files_or_texts:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and len(item) < 4096
                                              and os.path.isfile(item)):
            try:
                yield Path(item).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"train_tokenizer: expected paths or str, got {type(item).__name__}")


def train_tokenizer(
    files_or_texts: Iterable,
    out_prefix: str | os.PathLike,
    vocab_size: int = 16384,
    *,
    chunk_chars: int = 4096,
    max_chunks: int | None = None,
    num_threads: int | None = None,
    max_piece_length: int = 16,
    character_coverage: float = 0.9995,
    verbose: bool = False,
) -> Path:
    """Train a byte-exact BPE tokenizer; returns the path of ``{out_prefix}.model``.

    ``files_or_texts``: paths (``Path`` objects, or ``str`` naming an existing file) whose
    UTF-8 text is read, or ``str`` texts. Texts are fed as ~4 KB chunks that keep their
    newlines, so pieces may contain newlines and indentation.
    """
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    n_fixed = 3 + len(_CONTROL_NAMES) + 256
    if vocab_size < n_fixed + 16:
        raise ValueError(f"vocab_size {vocab_size} too small (needs > {n_fixed + 16})")

    def sentences() -> Iterator[str]:
        n = 0
        for text in _iter_training_texts(files_or_texts):
            # a literal "▁" would be indistinguishable from a space in the learned pieces
            text = text.replace(SPACE_MARK, "")
            for chunk in chunk_text(text, chunk_chars):
                yield chunk
                n += 1
                if max_chunks is not None and n >= max_chunks:
                    return

    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=character_coverage,  # rarer characters are spelled in bytes
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        split_digits=True,
        max_sentence_length=chunk_chars * 4 + 16,
        max_sentencepiece_length=max_piece_length,
        pad_id=0,
        pad_piece=SPECIAL_TOKENS["pad"],
        eos_id=1,
        eos_piece=SPECIAL_TOKENS["eos"],
        unk_id=2,
        unk_piece=UNK_PIECE,
        bos_id=-1,
        control_symbols=[SPECIAL_TOKENS[n] for n in _CONTROL_NAMES],
        hard_vocab_limit=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        minloglevel=0 if verbose else 2,
    )
    vocab = out_prefix.with_name(out_prefix.name + ".vocab")
    if vocab.exists():
        vocab.unlink()
    return out_prefix.with_name(out_prefix.name + ".model")
