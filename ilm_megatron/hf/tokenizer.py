"""Tokenizer files of a Hugging Face export, equivalent to the tokenizer the model was trained with.

:func:`write_hf_tokenizer` writes ``tokenizer.json`` and ``tokenizer_config.json`` into an export
folder, so that ``transformers.AutoTokenizer.from_pretrained(folder)`` gives exactly the token ids
of :mod:`ilm_megatron.data.tokenizer` (the ids the training data was made of):

* ``"byte"``: a byte-level BPE with no merges whose vocabulary is the 256 byte symbols of the
  byte-level alphabet in byte order, so UTF-8 byte ``b`` is id ``b``, plus the end-of-document
  token ``<|endoftext|>`` at id 256 (:class:`~ilm_megatron.data.tokenizer.ByteTokenizer`). The
  regex split of GPT-2 is off and no prefix space is added, so no byte is ever merged or inserted;
  ``split_special_tokens`` is on, so the text ``"<|endoftext|>"`` is encoded as its 13 bytes, as
  the byte tokenizer does.
* a path to a ``tokenizer.json``: the same definition
  (:class:`~ilm_megatron.data.tokenizer.HFTokenizer`), minus any post-processor that adds tokens:
  preprocessing never adds special tokens, so neither does the exported tokenizer, whatever
  ``add_special_tokens`` says.

The end-of-document token is the tokenizer's ``eos_token``, and also its ``bos_token`` (the
GPT-2 convention: in the training stream every document but the first follows an end-of-document
token). The pad token is a ``<pad>``/``<|pad|>`` token of the vocabulary if there is one, otherwise
the end-of-document token. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ilm_megatron.data.preprocess import atomic_write
from ilm_megatron.data.tokenizer import (
    DEFAULT_EOD_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
)
from ilm_megatron.errors import UserError

#: Tokens taken as the pad token when the vocabulary has one (first match wins).
PAD_TOKEN_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")


class HFTokenizerError(TokenizerError, UserError):
    """The tokenizer of an export cannot be written (missing or invalid ``tokenizer.json``)."""


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: byte ``b`` -> the printable character standing for it.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the
    68 others (control characters, space, DEL, NBSP, soft hyphen...) are mapped in byte order onto
    U+0100 and up. This is the mapping of the ``tokenizers`` ByteLevel pre-tokenizer and decoder.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    keep = set(printable)
    table: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def build_byte_tokenizer(eod_token: str = DEFAULT_EOD_TOKEN) -> Any:
    """A ``tokenizers.Tokenizer`` with the ids of :class:`ByteTokenizer` (bytes 0..255, EOD 256)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = byte_to_unicode()
    if set(table.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte_to_unicode() differs from the tokenizers ByteLevel alphabet")
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eod_token, special=True, normalized=False)])
    eod = tok.token_to_id(eod_token)
    if eod != ByteTokenizer.eod_id:  # cannot happen: 256 symbols, then the special token
        raise RuntimeError(f"end-of-document token got id {eod}, not {ByteTokenizer.eod_id}")
    return tok


def _adds_tokens(tok: Any) -> bool:
    """Whether the post-processor of ``tok`` inserts tokens (BOS/EOS templates and the like)."""
    if tok.post_processor is None:
        return False
    for text in ("a", "hello world"):
        if tok.encode(text).ids != tok.encode(text, add_special_tokens=False).ids:
            return True
    return False


def _load_tokenizer_json(path: Path, eod_token: str | None) -> tuple[Any, str]:
    """The ``tokenizers.Tokenizer`` of ``path`` and its end-of-document token, or a clear error."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise HFTokenizerError(f"tokenizer file {path} does not exist (or is not a file)")
    try:
        ref = HFTokenizer(path, eod_token=eod_token)  # validates the file and the EOD token
    except TokenizerError as exc:
        raise HFTokenizerError(str(exc)) from None
    tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    return tok, ref.eod_token


def write_hf_tokenizer(
    out_dir: Path,
    spec: str,
    eod_token: str | None = None,
    model_max_length: int | None = None,
) -> dict[str, int | None]:
    """Write the ``tokenizer.json`` and ``tokenizer_config.json`` of an export into ``out_dir``.

    Args:
        out_dir: the export folder (created if missing).
        spec: ``"byte"`` or the path of a Hugging Face ``tokenizer.json``, as for
            :func:`ilm_megatron.data.tokenizer.load_tokenizer`.
        eod_token: the end-of-document token; default ``<|endoftext|>``. It must be in the
            vocabulary of a ``tokenizer.json``; for ``"byte"`` only the default is allowed (the
            byte tokenizer has no token text of its own; id 256 is named ``<|endoftext|>``).
        model_max_length: ``model_max_length`` of the tokenizer config, if given (lm-eval and
            ``transformers`` use it when the model config names no context length).

    Returns:
        ``{"bos_token_id", "eos_token_id", "pad_token_id"}`` for ``generation_config.json``.

    Raises:
        HFTokenizerError: a missing or invalid ``tokenizer.json`` (the message names the file),
            an end-of-document token that is not in its vocabulary, or ``eod_token`` with "byte".
    """
    out_dir = Path(out_dir)
    if spec == "byte":
        if eod_token not in (None, DEFAULT_EOD_TOKEN):
            raise HFTokenizerError(
                f"eod_token cannot be set for the byte tokenizer (got {eod_token!r}; its "
                f"end-of-document token is id 256, {DEFAULT_EOD_TOKEN!r})"
            )
        tok, eod = build_byte_tokenizer(), DEFAULT_EOD_TOKEN
        split_special = True
    else:
        tok, eod = _load_tokenizer_json(Path(spec), eod_token)
        if _adds_tokens(tok):
            tok.post_processor = None
        split_special = False

    vocab = tok.get_vocab(with_added_tokens=True)
    pad = next((t for t in PAD_TOKEN_CANDIDATES if t in vocab), eod)
    eod_id = int(tok.token_to_id(eod))
    pad_id = int(tok.token_to_id(pad))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eod,
        "eos_token": eod,
        "pad_token": pad,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": split_special,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(out_dir / "tokenizer_config.json", text.encode("utf-8"))
    return {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": pad_id}
