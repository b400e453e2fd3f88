"""Tokenizer files of Hugging Face exports, checked against our own tokenizers as the reference.

For the byte tokenizer and for a byte-level BPE ``tokenizer.json`` trained here (the recipe of
``tools/train_tokenizer.py``), ``AutoTokenizer.from_pretrained`` on the folder written by
:func:`write_hf_tokenizer` must give exactly the ids of :class:`ByteTokenizer` /
:class:`HFTokenizer` (which the training data is made of) and decode them back to the text.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ilm_megatron.data.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402
from ilm_megatron.errors import UserError  # noqa: E402
from ilm_megatron.hf.tokenizer import (  # noqa: E402
    HFTokenizerError,
    byte_to_unicode,
    write_hf_tokenizer,
)

TEXTS = [
    "héllo wörld ✓",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n",
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキスト and emoji 🦊🚀, ¿qué tal? ß Ω ∑",
    "x<|endoftext|>y",  # the EOD token's text inside a document
    " ",
    "",
]

CORPUS = [
    "the cat sat on the mat. the dog sat on the log.",
    "héllo wörld, hello world, hello there",
    "numbers 12345 and 67890\nnew lines\tand tabs",
    "Ünïcödé text ✓ with symbols ∑ and emoji 🦊",
] * 20


def _auto(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _train_tokenizer_json(path: Path, special: list[str], vocab_size: int = 300) -> Path:
    """A byte-level BPE ``tokenizer.json`` trained like ``tools/train_tokenizer.py`` does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    path.write_text(tok.to_str(), encoding="utf-8")
    return path


def _check_same_ids(hf, ref, texts=TEXTS) -> None:
    for text in texts:
        want = ref.encode(text)
        assert hf.encode(text, add_special_tokens=False) == want, text
        # nothing is added by default either (lm-eval encodes with the default)
        assert hf.encode(text) == want, text
        assert hf.decode(want, skip_special_tokens=True) == ref.decode(want), text
        assert hf.decode([*want, ref.eod_id], skip_special_tokens=True) == ref.decode(want)
        if ref.eod_id not in want:  # a tokenizer.json finds its EOD token in the text
            assert hf.decode(want) == text, text


def test_byte_alphabet_matches_tokenizers():
    table = byte_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_byte_tokenizer_ids_match_byte_tokenizer(tmp_path):
    gen = write_hf_tokenizer(tmp_path, "byte")
    assert gen == {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}
    hf = _auto(tmp_path)
    ref = ByteTokenizer()
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == ref.eod_id == 256
    assert len(hf) == ref.vocab_size == 257
    _check_same_ids(hf, ref)
    # every single byte, and every byte value inside one text
    every = bytes(range(256)).decode("latin-1")
    assert hf.encode(every, add_special_tokens=False) == ref.encode(every)
    assert hf.convert_ids_to_tokens(list(range(256))) == [byte_to_unicode()[b] for b in range(256)]
    batch = hf(TEXTS[:4], add_special_tokens=False)["input_ids"]
    assert batch == ref.encode_batch(TEXTS[:4])
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["eos_token"] == "<|endoftext|>"


def test_trained_tokenizer_json_matches_hf_tokenizer(tmp_path):
    src = _train_tokenizer_json(tmp_path / "src.json", ["<|endoftext|>"])
    out = tmp_path / "export"
    gen = write_hf_tokenizer(out, str(src))
    ref = HFTokenizer(src)
    eod = ref.eod_id
    assert gen == {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod}
    hf = _auto(out)
    assert hf.eos_token_id == ref.eod_id
    # merges were learnt: the ids are not just bytes, so this checks the BPE model is carried over
    assert len(ref.encode("the cat sat on the mat")) < len("the cat sat on the mat")
    _check_same_ids(hf, ref, [*TEXTS, *CORPUS[:4]])


def test_custom_eod_pad_and_post_processor(tmp_path):
    """A post-processor that adds ``<s>`` is dropped: preprocessing never adds it, nor may HF."""
    from tokenizers import Tokenizer, processors

    src = _train_tokenizer_json(tmp_path / "src.json", ["<eod>", "<pad>", "<s>"])
    tok = Tokenizer.from_file(str(src))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    src.write_text(tok.to_str(), encoding="utf-8")
    assert tok.encode("abc").ids[0] == tok.token_to_id("<s>")  # the source does add it

    gen = write_hf_tokenizer(tmp_path / "export", str(src), eod_token="<eod>")
    ref = HFTokenizer(src, eod_token="<eod>")
    assert gen["eos_token_id"] == ref.eod_id == tok.token_to_id("<eod>")
    assert gen["pad_token_id"] == tok.token_to_id("<pad>")
    hf = _auto(tmp_path / "export")
    assert hf.eos_token == "<eod>" and hf.pad_token == "<pad>"
    _check_same_ids(hf, ref)


def test_missing_and_invalid_tokenizer_json(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(HFTokenizerError, match=str(missing)) as exc:
        write_hf_tokenizer(tmp_path / "out", str(missing))
    assert isinstance(exc.value, UserError)

    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "not a tokenizer"', encoding="utf-8")
    with pytest.raises(HFTokenizerError, match=f"invalid tokenizer file {bad}"):
        write_hf_tokenizer(tmp_path / "out", str(bad))

    src = _train_tokenizer_json(tmp_path / "src.json", ["<|endoftext|>"])
    with pytest.raises(HFTokenizerError, match=r"no end-of-document token '<eod>'"):
        write_hf_tokenizer(tmp_path / "out", str(src), eod_token="<eod>")
    with pytest.raises(HFTokenizerError, match="byte tokenizer"):
        write_hf_tokenizer(tmp_path / "out", "byte", eod_token="<eod>")
    assert not (tmp_path / "out").exists()  # nothing written on error
