"""Train a byte-level BPE ``tokenizer.json`` on local text with the ``tokenizers`` library.

Inputs are read exactly like ``preprocess_data.py`` reads them (``.txt``, ``.jsonl``,
``.jsonl.zst``; files and folders; ``--json-key``; bad records fail or are skipped). The result has
``<|endoftext|>`` as a special token (the default EOD token of ``preprocess_data.py``), a
byte-level pre-tokenizer and decoder, and is written atomically.

Usage::

    python tools/train_tokenizer.py --input corpus/ --output tokenizer.json --vocab-size 8192

Exit codes: 0 on success, 2 on bad arguments or bad inputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ilm_megatron.argtypes import positive_int
from ilm_megatron.data.preprocess import PreprocessError, Stats, atomic_write, read_texts
from ilm_megatron.data.tokenizer import DEFAULT_EOD_TOKEN

PROG = "train_tokenizer.py"


def train_tokenizer(
    inputs: Sequence[Path],
    output: Path,
    vocab_size: int,
    min_frequency: int = 2,
    json_key: str = "text",
    on_error: str = "fail",
) -> int:
    """Train a byte-level BPE tokenizer on ``inputs``, write it to ``output``; return #documents.

    Raises:
        PreprocessError: missing/unsupported inputs, bad records with ``on_error="fail"``, no
            document, or ``vocab_size`` below the 256 byte symbols plus the special token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise PreprocessError(
            f"--vocab-size must be at least 257 (256 bytes + EOD), not {vocab_size}"
        )
    stats = Stats()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[DEFAULT_EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_texts(inputs, json_key, on_error, stats), trainer)
    if stats.documents == 0:
        raise PreprocessError("no documents in the inputs")
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, tok.to_str().encode("utf-8"))
    return stats.documents


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog=PROG, description="Train a byte-level BPE tokenizer.json.")
    p.add_argument("--input", nargs="+", required=True, type=Path, metavar="PATH")
    p.add_argument("--output", required=True, type=Path, metavar="tokenizer.json")
    p.add_argument("--vocab-size", required=True, type=positive_int, metavar="N")
    p.add_argument("--min-frequency", type=positive_int, default=2, metavar="F")
    p.add_argument("--json-key", default="text", help="key of the text in jsonl records")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad arguments or inputs)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        n = train_tokenizer(
            args.input,
            args.output,
            args.vocab_size,
            min_frequency=args.min_frequency,
            json_key=args.json_key,
            on_error=args.on_error,
        )
    except PreprocessError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{PROG}: trained on {n} documents; {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
