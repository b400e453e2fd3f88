"""Tokenizers for the data pipeline: a built-in byte tokenizer and Hugging Face ``tokenizer.json``.

Both classes expose the same small interface (``encode``, ``encode_batch``, ``decode``, ``eod_id``,
``vocab_size``, ``name``, ``fingerprint()``), which is all :mod:`ilm_megatron.data.preprocess`
needs. Nothing is downloaded: the byte tokenizer is built in and the Hugging Face tokenizer is read
from a local ``tokenizer.json`` file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

DEFAULT_EOD_TOKEN = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer could not be loaded (missing file, invalid definition, no EOD token)."""


class Tokenizer(Protocol):
    """The interface shared by :class:`ByteTokenizer` and :class:`HFTokenizer`."""

    name: str
    eod_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOD appended)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text in ``texts``."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (the EOD token is dropped)."""
        ...

    def fingerprint(self) -> str:
        """Hex sha256 of the tokenizer definition."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte ``b`` is id ``b`` (0..255), end of document is id 256."""

    name = "byte"
    eod_id = 256
    vocab_size = 257
    _DEFINITION = "ilm_megatron ByteTokenizer v1: utf-8 bytes 0..255 -> ids 0..255, eod 256"

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ids (raises ``UnicodeEncodeError`` on lone surrogates)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids; EOD ids are dropped, invalid UTF-8 becomes U+FFFD."""
        data = bytes(int(i) for i in ids if int(i) != self.eod_id)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """Hex sha256 of a constant string describing the byte mapping."""
        return hashlib.sha256(self._DEFINITION.encode("utf-8")).hexdigest()


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a local ``tokenizer.json``.

    The end-of-document token is ``eod_token`` when given, otherwise ``<|endoftext|>``; it must be
    in the vocabulary.
    """

    def __init__(self, path: str | Path, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTok

        self.path = Path(path)
        try:
            self._bytes = self.path.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer file {self.path}: {exc}") from exc
        try:
            self._tok = _HFTok.from_str(self._bytes.decode("utf-8"))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise TokenizerError(f"invalid tokenizer file {self.path}: {exc}") from exc
        token = eod_token if eod_token is not None else DEFAULT_EOD_TOKEN
        eod = self._tok.token_to_id(token)
        if eod is None:
            raise TokenizerError(
                f"tokenizer file {self.path} has no end-of-document token {token!r}"
                " (pass eod_token / --eod-token)"
            )
        self.eod_token = token
        self.eod_id = int(eod)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.name = f"hf:{self.path.name}"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens added."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (EOD included) are dropped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        """Hex sha256 of the ``tokenizer.json`` bytes."""
        return hashlib.sha256(self._bytes).hexdigest()


def load_tokenizer(spec: str, eod_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` gives :class:`ByteTokenizer`; anything else is a path to a ``tokenizer.json``."""
    if spec == "byte":
        if eod_token is not None:
            raise TokenizerError("eod_token cannot be set for the byte tokenizer")
        return ByteTokenizer()
    return HFTokenizer(spec, eod_token=eod_token)
