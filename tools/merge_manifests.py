"""Join the outputs of ``preprocess_data.py --input-shard I/N`` jobs into one dataset.

Each job ``I`` of ``N`` writes ``part-IIIII-of-NNNNN-shard-KKKKKK.tar`` shards and a
``part-IIIII-of-NNNNN-manifest.json``. This tool finds the part manifests in the given folders,
checks that all ``N`` parts are present exactly once and that they agree on the tokenizer, the
sequence length, the shard layout, the settings and the full input file list, verifies every part
shard against its sha256, and rewrites the samples, in part order, into ``shard-NNNNNN.tar`` shards
with global sample keys plus a ``manifest.json``.

Because preprocess packs every input file on its own and jobs take contiguous slices of the sorted
input list, the merged folder is byte-identical (shards and manifest) to a single
``preprocess_data.py`` run on all the inputs. The output is built in a temporary folder next to
``--output`` and renamed into place, so ``--output`` either does not exist or is complete.

Usage::

    python tools/merge_manifests.py --output data/pile-byte data/pile-byte-parts

Exit codes: 0 on success, 2 on bad arguments or inconsistent/missing/damaged parts.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ilm_megatron.data.preprocess import (
    ERROR_KINDS,
    MANIFEST_NAME,
    SHARD_FIELD,
    ShardWriter,
    atomic_write,
    json_bytes,
    sample_key,
)

PROG = "merge_manifests.py"
_PART_MANIFEST_RE = re.compile(r"^part-(\d{5})-of-(\d{5})-manifest\.json$")
# Manifest entries every part must share with part 0 (``input_shard`` sub-keys are checked apart).
AGREE_KEYS = (
    "format_version",
    "seq_len",
    "sample_len",
    "samples_per_shard",
    "dtype",
    "field",
    "tokenizer",
    "seed",
    "json_key",
    "pile_set_names",
    "on_error",
)


class MergeError(Exception):
    """Missing, inconsistent or damaged parts, or a bad output folder (exit code 2)."""


def part_label(index: int, count: int) -> str:
    """``part-00003-of-00030``: how errors name a part."""
    return f"part-{index:05d}-of-{count:05d}"


def find_parts(dirs: Sequence[Path]) -> dict[int, tuple[Path, dict[str, Any]]]:
    """``{part index: (manifest path, manifest)}`` of the part manifests in ``dirs``.

    Raises:
        MergeError: no part manifest, unreadable manifest, parts of different ``N``, a part found
            twice, or missing parts (all named).
    """
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    counts: dict[int, Path] = {}
    for d in dirs:
        if not d.is_dir():
            raise MergeError(f"job folder {d} does not exist or is not a folder")
        for name in sorted(os.listdir(d)):
            m = _PART_MANIFEST_RE.match(name)
            if not m:
                continue
            index, count = int(m.group(1)), int(m.group(2))
            path = d / name
            try:
                manifest = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError) as exc:
                raise MergeError(f"{part_label(index, count)}: cannot read {path}: {exc}") from exc
            shard = manifest.get("input_shard") if isinstance(manifest, dict) else None
            if not isinstance(shard, dict) or (shard.get("index"), shard.get("count")) != (
                index,
                count,
            ):
                raise MergeError(
                    f"{part_label(index, count)}: {path} does not describe job {index} of {count}"
                )
            counts.setdefault(count, path)
            if index in found and count == found[index][1]["input_shard"]["count"]:
                raise MergeError(
                    f"{part_label(index, count)} found twice: {found[index][0]} and {path}"
                )
            found.setdefault(index, (path, manifest))
    if not found:
        raise MergeError(
            f"no part-IIIII-of-NNNNN-manifest.json in {', '.join(map(str, dirs))}"
            " (were the jobs run with --input-shard and did they finish?)"
        )
    if len(counts) > 1:
        seen = ", ".join(f"N={n} ({p})" for n, p in sorted(counts.items()))
        raise MergeError(f"parts of runs with different job counts: {seen}")
    (count,) = counts
    missing = [i for i in range(count) if i not in found]
    if missing:
        names = ", ".join(part_label(i, count) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise MergeError(
            f"missing {len(missing)} of {count} parts: {names}{more}"
            " (unfinished or failed jobs write no part manifest)"
        )
    return found


def check_agreement(parts: dict[int, tuple[Path, dict[str, Any]]]) -> None:
    """Raise :class:`MergeError` naming the first part whose settings differ from part 0."""
    count = len(parts)
    ref = parts[0][1]
    for index in range(1, count):
        path, man = parts[index]
        for key in AGREE_KEYS:
            if man.get(key) != ref.get(key):
                raise MergeError(
                    f"{part_label(index, count)} ({path}): {key} {man.get(key)!r} differs from"
                    f" {part_label(0, count)}'s {ref.get(key)!r}"
                )
        for key in ("inputs_total", "inputs_digest"):
            if man["input_shard"].get(key) != ref["input_shard"].get(key):
                raise MergeError(
                    f"{part_label(index, count)} ({path}): it was run on another input file list"
                    f" than {part_label(0, count)} (input_shard.{key} differs)"
                )


def _iter_part_samples(index: int, count: int, path: Path, man: dict[str, Any]) -> Iterator[bytes]:
    """``.npy`` bytes of the samples of one part, in order, after checking each shard's sha256."""
    label = part_label(index, count)
    key = 0
    for shard in man.get("shards", []):
        spath = path.parent / shard["name"]
        try:
            data = spath.read_bytes()
        except OSError as exc:
            raise MergeError(f"{label}: cannot read shard {spath}: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise MergeError(f"{label}: shard {spath} does not match its sha256 in {path.name}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            members = tf.getmembers()
            if len(members) != shard["samples"]:
                raise MergeError(
                    f"{label}: shard {spath} holds {len(members)} samples, not {shard['samples']}"
                )
            for m in members:
                if m.name != f"{sample_key(key)}.{SHARD_FIELD}":
                    raise MergeError(f"{label}: unexpected member {m.name} in {spath}")
                fh = tf.extractfile(m)
                assert fh is not None
                yield fh.read()
                key += 1
    if key != man.get("samples"):
        raise MergeError(f"{label}: shards hold {key} samples, manifest says {man.get('samples')}")


def merge(dirs: Sequence[Path], output: Path) -> dict[str, Any]:
    """Merge the parts found in ``dirs`` into ``output``; return the merged manifest.

    Raises:
        MergeError: see :func:`find_parts`, :func:`check_agreement`; damaged shards; ``output``
            exists and is not an empty folder; the parts hold no samples at all.
    """
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise MergeError(f"output {output} already exists and is not an empty folder")
    parts = find_parts(dirs)
    check_agreement(parts)
    count = len(parts)
    ref = parts[0][1]
    if not sum(int(man.get("samples", 0)) for _, man in parts.values()):
        raise MergeError(
            f"the {count} part(s) in {', '.join(map(str, dirs))} hold no samples (every input file"
            f" is shorter than one sample of {ref.get('sample_len')} tokens or has no document);"
            " nothing written"
        )
    tmp = output.parent / f".{output.name}.merge-tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from an interrupted merge into the same output
    tmp.mkdir(parents=True)
    try:
        writer = ShardWriter(tmp, int(ref["samples_per_shard"]), np.dtype(ref["dtype"]))
        for index in range(count):
            path, man = parts[index]
            for data in _iter_part_samples(index, count, path, man):
                writer.add_npy(data)
        writer.flush()
        mans = [parts[i][1] for i in range(count)]
        manifest = {key: ref.get(key) for key in AGREE_KEYS}
        manifest.update(
            {
                "samples": writer.samples,
                "tokens": writer.samples * int(ref["sample_len"]),
                "tokens_total": sum(int(m["tokens_total"]) for m in mans),
                "dropped_tail_tokens": sum(int(m["dropped_tail_tokens"]) for m in mans),
                "shards": writer.shards,
                "sources": [s for m in mans for s in m["sources"]],
                "documents": {
                    k: sum(int(m["documents"][k]) for m in mans)
                    for k in ("tokenized", "filtered", "errors")
                },
                "errors": {k: sum(int(m["errors"].get(k, 0)) for m in mans) for k in ERROR_KINDS},
            }
        )
        atomic_write(tmp / MANIFEST_NAME, json_bytes(manifest))
        if output.exists():
            output.rmdir()  # empty (checked above)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"{PROG}: {count} part(s) -> {manifest['samples']} samples in {len(writer.shards)}"
        f" shard(s); {output}",
        file=sys.stderr,
    )
    return manifest


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Join preprocess_data.py --input-shard parts into one dataset."
    )
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="merged dataset")
    p.add_argument(
        "jobdirs", nargs="+", type=Path, metavar="JOBDIR", help="folders holding the parts"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad arguments or parts)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        merge(args.jobdirs, args.output)
    except MergeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
