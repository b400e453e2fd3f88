"""Convert Megatron-LM indexed datasets (``PREFIX.bin``/``PREFIX.idx``) into our packed shards.

No re-tokenization: the token ids are read from the ``.bin`` file (see
:mod:`ilm_megatron.data.megatron_indexed` for the layout), each document gets the EOD id appended
per ``--append-eod``, the documents of one input are concatenated and cut into samples of
``seq_len + 1`` tokens exactly as ``preprocess_data.py`` packs one input file (the tail of each
input is dropped), and written as ``shard-NNNNNN.tar`` shards plus ``manifest.json``. The tokenizer
fields of the manifest come from the flags (``--tokenizer-json`` gives the same fingerprint as a
``preprocess_data.py`` run with that tokenizer).

Usage::

    python tools/convert_megatron_dataset.py --input data/pile_text_document --output data/pile \
        --seq-len 2048 --vocab-size 50257 --eod-id 50256 --tokenizer-json gpt2/tokenizer.json

Exit codes: 0 on success, 2 on bad arguments or bad input files (messages name the file).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ilm_megatron.argtypes import positive_int
from ilm_megatron.data.megatron_indexed import IndexedDataset, IndexedDatasetError
from ilm_megatron.data.preprocess import (
    ERROR_KINDS,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_FIELD,
    Packer,
    ShardWriter,
    atomic_write,
    json_bytes,
    sha256_file,
    token_dtype,
)

PROG = "convert_megatron_dataset.py"


class ConvertError(Exception):
    """Bad arguments or input files (exit code 2)."""


def convert(
    prefixes: Sequence[str],
    output: Path,
    seq_len: int,
    vocab_size: int,
    eod_id: int,
    append_eod: str = "auto",
    samples_per_shard: int = 1024,
    tokenizer_name: str | None = None,
    tokenizer_fingerprint: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert the datasets ``prefixes`` (each packed on its own, in order) to ``output``.

    ``append_eod``: ``"auto"`` appends ``eod_id`` to documents not already ending with it,
    ``"always"`` to every document, ``"never"`` to none. Returns the manifest (also written).

    Raises:
        ConvertError: bad settings, unreadable dataset, token ids outside ``[0, vocab_size)``,
            non-empty output folder.
    """
    if append_eod not in ("auto", "always", "never"):
        raise ConvertError(f"--append-eod must be auto, always or never, not {append_eod!r}")
    if not 0 <= eod_id < vocab_size:
        raise ConvertError(f"--eod-id {eod_id} is outside the vocabulary [0, {vocab_size})")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConvertError(f"output {output} exists and is not an empty folder")
    try:
        datasets = [IndexedDataset(p) for p in prefixes]
    except IndexedDatasetError as exc:
        raise ConvertError(str(exc)) from exc
    for ds in datasets:
        if ds.dtype.kind not in "iu":
            raise ConvertError(f"{ds.idx_path}: token dtype {ds.dtype} is not an integer type")
    output.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(output, samples_per_shard, dtype)
    packer = Packer(writer, seq_len + 1)
    eod = np.array([eod_id], dtype=np.int64)
    documents = 0
    try:
        for ds in datasets:
            for d, doc in enumerate(ds.iter_documents()):
                toks = doc.astype(np.int64)
                if len(toks) and (int(toks.min()) < 0 or int(toks.max()) >= vocab_size):
                    raise ConvertError(
                        f"{ds.bin_path}: document {d} has token ids outside [0, {vocab_size})"
                    )
                ends_with_eod = len(toks) > 0 and int(toks[-1]) == eod_id
                if append_eod == "always" or (append_eod == "auto" and not ends_with_eod):
                    toks = np.concatenate([toks, eod])
                packer.add(toks)
                documents += 1
            packer.end_source()
        writer.flush()
    except BaseException:
        for e in os.listdir(output):
            if e.startswith(".") and e.endswith(".tmp"):
                (output / e).unlink()
        raise
    sources = []
    for ds in datasets:
        for p in (ds.idx_path, ds.bin_path):
            sources.append({"path": str(p.resolve()), "size": p.stat().st_size})
            sources[-1]["sha256"] = sha256_file(p)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "sample_len": seq_len + 1,
        "samples_per_shard": samples_per_shard,
        "dtype": dtype.str,
        "field": SHARD_FIELD,
        "samples": writer.samples,
        "tokens": writer.samples * (seq_len + 1),
        "tokens_total": packer.total,
        "dropped_tail_tokens": packer.dropped,
        "shards": writer.shards,
        "tokenizer": {
            "name": tokenizer_name or "megatron",
            "fingerprint": tokenizer_fingerprint,
            "vocab_size": vocab_size,
            "eod_id": eod_id,
        },
        "sources": sources,
        "seed": seed,
        "json_key": None,
        "pile_set_names": None,
        "on_error": "fail",
        "documents": {"tokenized": documents, "filtered": 0, "errors": 0},
        "errors": {k: 0 for k in ERROR_KINDS},
        "converted_from": {"format": "megatron_mmap_indexed", "append_eod": append_eod},
    }
    atomic_write(output / MANIFEST_NAME, json_bytes(manifest))
    print(
        f"{PROG}: {documents} documents, {packer.total} tokens -> {writer.samples} samples in"
        f" {len(writer.shards)} shard(s), {packer.dropped} tail tokens dropped; {output}",
        file=sys.stderr,
    )
    return manifest


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Convert Megatron-LM .bin/.idx datasets into packed shards."
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PREFIX",
        help="dataset prefixes (PREFIX.bin and PREFIX.idx); each is packed on its own",
    )
    p.add_argument("--output", required=True, type=Path, metavar="DIR")
    p.add_argument("--seq-len", required=True, type=positive_int, metavar="N")
    p.add_argument("--vocab-size", required=True, type=positive_int, metavar="V")
    p.add_argument("--eod-id", required=True, type=int, metavar="E")
    p.add_argument(
        "--append-eod",
        choices=("auto", "always", "never"),
        default="auto",
        help="append E to documents: auto (unless already last, default), always, never",
    )
    p.add_argument("--samples-per-shard", type=positive_int, default=1024, metavar="K")
    p.add_argument("--tokenizer-name", default=None, help="manifest tokenizer.name")
    fp = p.add_mutually_exclusive_group()
    fp.add_argument(
        "--tokenizer-json",
        type=Path,
        default=None,
        metavar="PATH",
        help="tokenizer.json whose sha256 becomes the manifest fingerprint",
    )
    fp.add_argument("--tokenizer-fingerprint", default=None, metavar="HEX")
    p.add_argument("--seed", type=int, default=0, help="recorded in the manifest")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad arguments or inputs)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        fingerprint = args.tokenizer_fingerprint
        name = args.tokenizer_name
        if args.tokenizer_json is not None:
            if not args.tokenizer_json.is_file():
                raise ConvertError(f"tokenizer file {args.tokenizer_json} not found")
            fingerprint = sha256_file(args.tokenizer_json)
            name = name or f"hf:{args.tokenizer_json.name}"
        convert(
            args.input,
            args.output,
            args.seq_len,
            args.vocab_size,
            args.eod_id,
            append_eod=args.append_eod,
            samples_per_shard=args.samples_per_shard,
            tokenizer_name=name,
            tokenizer_fingerprint=fingerprint,
            seed=args.seed,
        )
    except ConvertError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
