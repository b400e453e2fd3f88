"""Tokenize text corpora (the Pile: ``.jsonl``, ``.jsonl.zst``, ``.txt``) into WebDataset shards.

Documents are read in a deterministic order (input files sorted by path, lines in file order),
tokenized (in parallel worker processes when ``--workers > 1``), followed by the EOD token,
concatenated and cut into samples of ``seq_len + 1`` tokens. Packing is per input file: the token
stream of each file is cut on its own and its tail (shorter than a sample) is dropped, so the
samples of a file do not depend on the other files. Samples are written to ``shard-NNNNNN.tar``
files of ``--samples-per-shard`` samples; ``manifest.json`` is written last. Workers only tokenize;
reading, packing and writing happen in order in the parent process, so the output is
byte-identical whatever the worker count. See ``docs/data.md`` for the format.

With ``--input-shard I/N`` the run is job ``I`` of ``N``: it takes the ``I``-th contiguous slice of
the sorted input file list and writes ``part-IIIII-of-NNNNN-shard-KKKKKK.tar`` shards and a
``part-IIIII-of-NNNNN-manifest.json``; ``tools/merge_manifests.py`` joins the parts into a dataset
byte-identical to a single run on all the inputs (see ``docs/data_tools.md``).

Exit codes of :func:`main`: 0 on success, 2 on bad arguments or bad inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ilm_megatron.argtypes import positive_int
from ilm_megatron.data.tokenizer import TokenizerError, load_tokenizer

FORMAT_VERSION = 1
PROG = "preprocess_data.py"
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"
SHARD_FIELD = "tokens.npy"
SUFFIXES = (".jsonl", ".jsonl.zst", ".txt")
ERROR_KINDS = (
    "invalid_json",
    "not_an_object",
    "missing_key",
    "non_string_text",
    "invalid_utf8",
    "empty_document",
    "truncated_zst",
)
_SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
_PART_RE = re.compile(r"^\.?part-(\d{5})-of-(\d{5})-")
_BATCH_DOCS = 64
_BATCH_CHARS = 1 << 22
_READ_CHUNK = 1 << 20
_MAX_REPORTED = 20


class PreprocessError(Exception):
    """Bad arguments or bad inputs; :func:`main` prints the message and exits with code 2."""


def shard_name(index: int, prefix: str = "") -> str:
    """File name of shard ``index``: ``shard-000000.tar``, ... (``prefix`` put in front)."""
    return f"{prefix}shard-{index:06d}.tar"


def part_prefix(index: int, count: int) -> str:
    """File-name prefix of job ``index`` of ``count``: ``part-00003-of-00030-``."""
    return f"part-{index:05d}-of-{count:05d}-"


def parse_input_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` as ``(I, N)`` with ``0 <= I < N``; raises :class:`PreprocessError` otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise PreprocessError(f"--input-shard must be I/N (e.g. 3/30), got {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count or count > 99999:
        raise PreprocessError(f"--input-shard {text!r}: need 0 <= I < N <= 99999")
    return index, count


def select_input_shard(files: Sequence[Path], index: int, count: int) -> list[Path]:
    """Job ``index`` of ``count``: the contiguous slice ``[index*F//count, (index+1)*F//count)``.

    Whole files only; consecutive jobs take consecutive files, so concatenating the jobs' outputs
    in job order gives the file order of a single run. Jobs may get no file when ``count > F``.
    """
    n = len(files)
    return list(files[index * n // count : (index + 1) * n // count])


def input_list_digest(files: Sequence[Path]) -> str:
    """Hex sha256 of the sorted input list (resolved paths and sizes), cheap to compute per job."""
    listing = [[str(f), f.stat().st_size] for f in files]
    return hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()


def sample_key(index: int) -> str:
    """WebDataset ``__key__`` of global sample ``index`` (zero-padded, no dots)."""
    return f"{index:012d}"


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian ``uint16`` when all ids fit (vocab_size <= 65536), else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


@dataclass
class Options:
    """Settings of one preprocessing run (the parsed command line)."""

    inputs: list[Path]
    output: Path
    tokenizer: str
    seq_len: int
    samples_per_shard: int = 1024
    workers: int = 1
    json_key: str = "text"
    pile_set_names: list[str] | None = None
    on_error: str = "fail"
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    eod_token: str | None = None
    progress_bar: bool | None = None
    input_shard: tuple[int, int] | None = None


@dataclass
class Stats:
    """Document and error counts gathered while reading."""

    documents: int = 0
    filtered: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in ERROR_KINDS})
    reported: int = 0


# ----------------------------------------------------------------------------------------- reading


class _TruncatedError(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def _iter_chunks(path: Path) -> Iterator[bytes]:
    """Raw (decompressed for ``.zst``) bytes of ``path``; ``_TruncatedError`` if cut short."""
    with open(path, "rb") as fh:
        if not path.name.endswith(".zst"):
            while chunk := fh.read(_READ_CHUNK):
                yield chunk
            return
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        obj = None
        in_frame = False
        while chunk := fh.read(_READ_CHUNK):
            buf = chunk
            while buf:
                if obj is None:
                    obj = dctx.decompressobj()
                try:
                    out = obj.decompress(buf)
                except zstandard.ZstdError as exc:
                    raise _TruncatedError(0) from exc
                in_frame = True
                if out:
                    yield out
                if obj.eof:
                    buf, obj, in_frame = obj.unused_data, None, False
                else:
                    buf = b""
        if in_frame:
            raise _TruncatedError(0)


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line_number, line_bytes)`` of a file; ``_TruncatedError`` if cut short."""
    rest = b""
    lineno = 0
    try:
        for chunk in _iter_chunks(path):
            parts = (rest + chunk).split(b"\n")
            rest = parts.pop()
            for part in parts:
                lineno += 1
                yield lineno, part
    except _TruncatedError as exc:
        raise _TruncatedError(lineno + 1) from exc
    if rest:
        yield lineno + 1, rest


class _BadRecordError(Exception):
    def __init__(self, kind: str, line: int, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.line, self.detail = kind, line, detail


def _parse_json_line(raw: bytes, line: int, key: str, names: set[str] | None) -> str | None:
    """Text of one jsonl record, ``None`` when filtered out; raises ``_BadRecordError``."""
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRecordError("invalid_utf8", line, f"invalid UTF-8 at byte {exc.start}") from None
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as exc:
        raise _BadRecordError("invalid_json", line, f"invalid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise _BadRecordError("not_an_object", line, f"JSON {type(obj).__name__}, not an object")
    if names is not None:
        meta = obj.get("meta")
        name = meta.get("pile_set_name") if isinstance(meta, dict) else None
        if name not in names:
            return None
    if key not in obj:
        raise _BadRecordError("missing_key", line, f"no key {key!r}")
    text = obj[key]
    if not isinstance(text, str):
        raise _BadRecordError("non_string_text", line, f"{key!r} is {type(text).__name__}, not str")
    return text


def _check_text(text: str, line: int) -> str:
    if not text.strip():
        raise _BadRecordError("empty_document", line, "empty document")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _BadRecordError(
            "invalid_utf8", line, f"unencodable character at {exc.start}"
        ) from None
    return text


def _record(raw: bytes, line: int, key: str, names: set[str] | None) -> str | None:
    text = _parse_json_line(raw, line, key, names)
    return None if text is None else _check_text(text, line)


def _iter_file(
    path: Path, key: str, names: set[str] | None
) -> Iterator[str | None | _BadRecordError]:
    """Per record of one file: its text, ``None`` (filtered out) or a ``_BadRecordError``."""
    if path.name.endswith(".txt"):
        data = b"".join(_iter_chunks(path))
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            yield _BadRecordError("invalid_utf8", line, f"invalid UTF-8 at byte {exc.start}")
            return
        try:
            yield _check_text(text, 1)
        except _BadRecordError as bad:
            yield bad
        return
    try:
        for line, raw in _iter_lines(path):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                yield _record(raw, line, key, names)
            except _BadRecordError as bad:
                yield bad
    except _TruncatedError as exc:
        yield _BadRecordError("truncated_zst", exc.line, "truncated or corrupt zstd stream")


def _iter_good(
    files: Sequence[Path], key: str, names: set[str] | None, on_error: str, stats: Stats
) -> Iterator[str]:
    for path in files:
        for item in _iter_file(path, key, names):
            if item is None:
                stats.filtered += 1
            elif isinstance(item, _BadRecordError):
                stats.errors[item.kind] += 1
                where = f"{path}:{item.line}: {item.kind}: {item.detail}"
                if on_error == "fail":
                    raise PreprocessError(f"{where} (pass --on-error skip to skip bad records)")
                if stats.reported < _MAX_REPORTED:
                    print(f"{PROG}: warning: skipped {where}", file=sys.stderr)
                stats.reported += 1
            else:
                stats.documents += 1
                yield item


def iter_documents(files: Sequence[Path], opts: Options, stats: Stats) -> Iterator[str]:
    """Texts of all good documents of ``files`` in order; bad records handled per ``on_error``."""
    names = set(opts.pile_set_names) if opts.pile_set_names else None
    yield from _iter_good(files, opts.json_key, names, opts.on_error, stats)


def read_texts(
    paths: Sequence[Path],
    json_key: str = "text",
    on_error: str = "fail",
    stats: Stats | None = None,
) -> Iterator[str]:
    """Texts of the documents of ``paths`` (files/folders, as ``--input``), read as preprocess does.

    Bad records raise :class:`PreprocessError` (``on_error="fail"``) or are skipped and counted in
    ``stats`` (``"skip"``). Used by ``tools/train_tokenizer.py``.
    """
    if on_error not in ("fail", "skip"):
        raise PreprocessError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    files = find_inputs(paths)
    yield from _iter_good(files, json_key, None, on_error, stats if stats is not None else Stats())


# ------------------------------------------------------------------------------------ tokenizing

_WORKER_TOKENIZER: Any = None


def _init_worker(spec: str, eod_token: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(spec, eod_token=eod_token)


def _tokenize_batch(texts: list[str], tok: Any = None) -> np.ndarray:
    """Concatenated ``tokens(doc) + [EOD]`` of each text, as int64."""
    tok = tok if tok is not None else _WORKER_TOKENIZER
    pieces: list[np.ndarray] = []
    eod = np.array([tok.eod_id], dtype=np.int64)
    for ids in tok.encode_batch(texts):
        pieces.append(np.asarray(ids, dtype=np.int64))
        pieces.append(eod)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _batches(docs: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in docs:
        batch.append(text)
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# -------------------------------------------------------------------------------------- writing


def sha256_file(path: Path) -> str:
    """Hex sha256 of the bytes of ``path`` (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it to ``path``."""
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented, key-sorted JSON text with a final newline (the manifest layout)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _npy_bytes(row: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, row, allow_pickle=False)
    return bio.getvalue()


def tar_bytes(samples: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (ustar, mtime 0, uid/gid 0) with one ``<key>.tokens.npy`` per sample."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, data in samples:
            info = tarfile.TarInfo(f"{key}.{SHARD_FIELD}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tf.addfile(info, io.BytesIO(data))
    return bio.getvalue()


class ShardWriter:
    """Collects samples into shards and writes each atomically.

    Shards are named ``shard_name(k, prefix)``. When ``progress_name`` is set, the shards done so
    far are recorded there with ``config`` after each shard (used by ``--resume``); shards listed in
    ``done`` (name -> sha256) whose new bytes hash the same are not rewritten.
    """

    def __init__(
        self,
        out: Path,
        samples_per_shard: int,
        dtype: np.dtype,
        config: dict | None = None,
        done: dict[str, str] | None = None,
        prefix: str = "",
        progress_name: str | None = None,
    ) -> None:
        self.out, self.samples_per_shard, self.dtype = out, samples_per_shard, dtype
        self.config, self.done = config, done or {}
        self.prefix, self.progress_name = prefix, progress_name
        self.pending: list[tuple[str, bytes]] = []
        self.shards: list[dict[str, Any]] = []
        self.samples = 0
        self.reused = 0

    def add(self, row: np.ndarray) -> None:
        """Append one sample (converted to the shard dtype)."""
        self.add_npy(_npy_bytes(row.astype(self.dtype)))

    def add_npy(self, data: bytes) -> None:
        """Append one sample given as the bytes of its ``.npy`` member (already in shard dtype)."""
        self.pending.append((sample_key(self.samples), data))
        self.samples += 1
        if len(self.pending) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the pending samples as the next shard (nothing when none are pending)."""
        if not self.pending:
            return
        name = shard_name(len(self.shards), self.prefix)
        data = tar_bytes(self.pending)
        digest = hashlib.sha256(data).hexdigest()
        if self.done.get(name) == digest:
            self.reused += 1  # --resume: identical shard already on disk
        else:
            atomic_write(self.out / name, data)
        self.shards.append({"name": name, "samples": len(self.pending), "sha256": digest})
        self.pending = []
        if self.progress_name is not None:
            progress = {
                "format_version": FORMAT_VERSION,
                "config": self.config,
                "shards": self.shards,
            }
            atomic_write(self.out / self.progress_name, json_bytes(progress))


class Packer:
    """Cuts token streams into samples of ``row_len`` tokens and hands them to a writer.

    Each source (input file) is packed on its own: :meth:`end_source` drops the tail of the
    current source (fewer than ``row_len`` tokens) and counts it in ``dropped``.
    """

    def __init__(self, writer: ShardWriter, row_len: int) -> None:
        self.writer, self.row_len = writer, row_len
        self.total = 0
        self.dropped = 0
        self._carry: list[np.ndarray] = []
        self._carry_len = 0

    def add(self, arr: np.ndarray) -> None:
        """Append the tokens ``arr`` to the current source's stream."""
        self.total += len(arr)
        self._carry.append(arr)
        self._carry_len += len(arr)
        if self._carry_len < self.row_len:
            return
        buf = np.concatenate(self._carry)
        n = len(buf) // self.row_len
        for row in buf[: n * self.row_len].reshape(n, self.row_len):
            self.writer.add(row)
        rest = buf[n * self.row_len :]
        self._carry, self._carry_len = [rest], len(rest)

    def end_source(self) -> None:
        """Drop the tail of the current source; the next tokens start a new sample."""
        self.dropped += self._carry_len
        self._carry, self._carry_len = [], 0


# ----------------------------------------------------------------------------------------- inputs


def find_inputs(paths: Sequence[Path]) -> list[Path]:
    """Input files: files as given, folders searched recursively for supported suffixes; sorted."""
    files: set[Path] = set()
    for p in paths:
        if p.is_dir():
            for f in p.rglob("*"):
                if f.is_file() and f.name.endswith(SUFFIXES):
                    files.add(f.resolve())
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise PreprocessError(
                    f"unsupported input file {p} (expected {', '.join(SUFFIXES)})"
                )
            files.add(p.resolve())
        else:
            raise PreprocessError(f"input {p} does not exist")
    if not files:
        raise PreprocessError(f"no {', '.join(SUFFIXES)} files found in the inputs")
    return sorted(files, key=str)


def _is_ours(name: str, prefix: str) -> bool:
    """Whether ``name`` is a file this run (file prefix ``prefix``) writes in its output folder."""
    bare = name[1:-4] if name.startswith(".") and name.endswith(".tmp") else name
    if not bare.startswith(prefix):
        return False
    rest = bare[len(prefix) :]
    return bool(_SHARD_RE.match(rest)) or rest in (MANIFEST_NAME, PROGRESS_NAME)


def _prepare_output(out: Path, opts: Options, config: dict, prefix: str) -> dict[str, str]:
    """Check/clean the output folder; return ``{shard name: sha256}`` reusable under --resume.

    With a part prefix (``--input-shard``) the folder may be shared by the jobs: only this job's
    files are considered and other parts' files are left alone.
    """
    if out.exists() and not out.is_dir():
        raise PreprocessError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(os.listdir(out))
    mine = [e for e in entries if _is_ours(e, prefix)]
    foreign = [e for e in entries if e not in mine and not (prefix and _PART_RE.match(e))]
    again = opts.resume or opts.overwrite
    if (mine or (foreign and not prefix)) and not again:
        what = f"already holds files of {prefix[:-1]}" if prefix else "is not empty"
        raise PreprocessError(f"output folder {out} {what} (pass --resume or --overwrite)")
    if foreign:
        raise PreprocessError(
            f"output folder {out} holds files this tool did not write ({', '.join(foreign[:5])});"
            " refusing to touch it"
        )
    entries = mine
    done: dict[str, str] = {}
    progress_name = prefix + PROGRESS_NAME
    if opts.resume and progress_name in entries:
        try:
            progress = json.loads((out / progress_name).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise PreprocessError(f"cannot read {out / progress_name}: {exc}") from exc
        if progress.get("config") != config:
            raise PreprocessError(
                f"cannot resume in {out}: it was started with other inputs or settings"
                " (pass --overwrite to start again)"
            )
        for shard in progress.get("shards", []):
            path = out / shard["name"]
            if path.is_file() and sha256_file(path) == shard["sha256"]:
                done[shard["name"]] = shard["sha256"]
    for e in entries:
        if e not in done:
            (out / e).unlink()
    return done


# ------------------------------------------------------------------------------------------- run


def _describe_inputs(files: Sequence[Path], limit: int = 3) -> str:
    """The input files for a message: all of them, or the first ``limit`` and their count."""
    shown = ", ".join(str(f) for f in files[:limit])
    return shown if len(files) <= limit else f"{shown}, ... ({len(files)} input files)"


def _remove_outputs(out: Path, prefix: str, created: bool) -> None:
    """Delete this run's files in ``out`` (and ``out`` itself when this run created it)."""
    for e in os.listdir(out):
        if _is_ours(e, prefix):
            (out / e).unlink()
    if created and not any(out.iterdir()):
        out.rmdir()


def _file_batches(
    files: Sequence[Path], opts: Options, stats: Stats
) -> Iterator[tuple[int, list[str]]]:
    """``(file index, batch of texts)``; a batch never spans two files."""
    for i, path in enumerate(files):
        for batch in _batches(iter_documents([path], opts, stats)):
            yield i, batch


def run(opts: Options) -> dict[str, Any]:
    """Run the preprocessing described by ``opts``; return the manifest (also written)."""
    if opts.resume and opts.overwrite:
        raise PreprocessError("--resume and --overwrite cannot be used together")
    if opts.on_error not in ("fail", "skip"):
        raise PreprocessError(f"--on-error must be 'fail' or 'skip', not {opts.on_error!r}")
    for name, value in (
        ("--seq-len", opts.seq_len),
        ("--samples-per-shard", opts.samples_per_shard),
        ("--workers", opts.workers),
    ):
        if value < 1:
            raise PreprocessError(f"{name} must be a positive integer, got {value}")
    all_files = find_inputs(opts.inputs)
    prefix = ""
    shard_info = None
    files = all_files
    if opts.input_shard is not None:
        index, count = opts.input_shard
        if not 0 <= index < count:
            raise PreprocessError(f"--input-shard {index}/{count}: need 0 <= I < N")
        prefix = part_prefix(index, count)
        files = select_input_shard(all_files, index, count)
        shard_info = {
            "index": index,
            "count": count,
            "inputs_total": len(all_files),
            "inputs_digest": input_list_digest(all_files),
        }
    try:
        tok = load_tokenizer(opts.tokenizer, eod_token=opts.eod_token)
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from exc
    sources = [{"path": str(f), "size": f.stat().st_size, "sha256": sha256_file(f)} for f in files]
    tokenizer_info = {
        "name": tok.name,
        "fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
    }
    dtype = token_dtype(tok.vocab_size)
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "sources": sources,
        "tokenizer": tokenizer_info,
        "seq_len": opts.seq_len,
        "samples_per_shard": opts.samples_per_shard,
        "json_key": opts.json_key,
        "pile_set_names": sorted(opts.pile_set_names) if opts.pile_set_names else None,
        "on_error": opts.on_error,
        "seed": opts.seed,
    }
    if shard_info is not None:
        config["input_shard"] = shard_info
    out = opts.output
    created = not out.exists()
    done = _prepare_output(out, opts, config, prefix)
    stats = Stats()
    writer = ShardWriter(
        out,
        opts.samples_per_shard,
        dtype,
        config,
        done,
        prefix=prefix,
        progress_name=prefix + PROGRESS_NAME,
    )
    row_len = opts.seq_len + 1
    packer = Packer(writer, row_len)
    current = -1

    def consume(file_index: int, arr: np.ndarray) -> None:
        nonlocal current
        if file_index != current:
            packer.end_source()  # packing restarts at every input file
            current = file_index
        packer.add(arr)

    from tqdm import tqdm

    show = sys.stderr.isatty() if opts.progress_bar is None else opts.progress_bar
    bar = tqdm(unit="doc", desc="tokenizing", disable=not show, file=sys.stderr)
    pool = None
    try:
        batches = _file_batches(files, opts, stats)
        if opts.workers == 1:
            for fi, batch in batches:
                consume(fi, _tokenize_batch(batch, tok))
                bar.update(len(batch))
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(opts.workers, _init_worker, (opts.tokenizer, opts.eod_token))
            window: deque = deque()
            for fi, batch in batches:
                window.append((fi, len(batch), pool.apply_async(_tokenize_batch, (batch,))))
                if len(window) >= 2 * opts.workers:
                    fj, n, res = window.popleft()
                    consume(fj, res.get())
                    bar.update(n)
            while window:
                fj, n, res = window.popleft()
                consume(fj, res.get())
                bar.update(n)
            pool.close()
            pool.join()
            pool = None
        packer.end_source()
        writer.flush()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for e in os.listdir(out):
            if e.startswith(".") and e.endswith(".tmp") and _is_ours(e, prefix):
                (out / e).unlink()
        raise
    finally:
        bar.close()

    if writer.samples == 0 and shard_info is None:
        _remove_outputs(out, prefix, created)
        raise PreprocessError(
            f"{_describe_inputs(files)}: no samples: {stats.documents} document(s),"
            f" {packer.total} token(s), fewer than one sample of --seq-len + 1 = {row_len} tokens"
            " in any input file (each file is packed on its own); nothing written to"
            f" {out}"
        )
    n_errors = sum(stats.errors.values())
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "seq_len": opts.seq_len,
        "sample_len": row_len,
        "samples_per_shard": opts.samples_per_shard,
        "dtype": dtype.str,
        "field": SHARD_FIELD,
        "samples": writer.samples,
        "tokens": writer.samples * row_len,
        "tokens_total": packer.total,
        "dropped_tail_tokens": packer.dropped,
        "shards": writer.shards,
        "tokenizer": tokenizer_info,
        "sources": sources,
        "seed": opts.seed,
        "json_key": opts.json_key,
        "pile_set_names": config["pile_set_names"],
        "on_error": opts.on_error,
        "documents": {
            "tokenized": stats.documents,
            "filtered": stats.filtered,
            "errors": n_errors,
        },
        "errors": dict(stats.errors),
    }
    if shard_info is not None:
        manifest["input_shard"] = shard_info
    atomic_write(out / (prefix + MANIFEST_NAME), json_bytes(manifest))
    if n_errors:
        counts = ", ".join(f"{k}={v}" for k, v in stats.errors.items() if v)
        print(f"{PROG}: skipped {n_errors} bad record(s): {counts}", file=sys.stderr)
    reused = f" ({writer.reused} reused)" if writer.reused else ""
    job = f"{prefix[:-1]}: {len(files)} of {len(all_files)} input file(s), " if prefix else ""
    print(
        f"{PROG}: {job}{stats.documents} documents, {packer.total} tokens -> {writer.samples}"
        f" samples in {len(writer.shards)} shard(s){reused}, {packer.dropped} tail tokens"
        f" dropped; {out}",
        file=sys.stderr,
    )
    return manifest


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``tools/preprocess_data.py``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize .jsonl/.jsonl.zst/.txt corpora into packed WebDataset shards.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        type=Path,
        metavar="PATH",
        help="input files or folders (folders: all .jsonl, .jsonl.zst, .txt inside)",
    )
    p.add_argument("--output", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="byte|PATH",
        help="'byte' or a path to a Hugging Face tokenizer.json",
    )
    p.add_argument(
        "--eod-token",
        default=None,
        help="end-of-document token of a tokenizer.json (default <|endoftext|>)",
    )
    p.add_argument(
        "--seq-len",
        required=True,
        type=positive_int,
        metavar="N",
        help="sequence length; samples hold N+1 tokens",
    )
    p.add_argument("--samples-per-shard", type=positive_int, default=1024, metavar="K")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="W",
        help="tokenizer processes (output does not depend on it)",
    )
    p.add_argument("--json-key", default="text", help="key of the text in jsonl records")
    p.add_argument(
        "--pile-set-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="keep only jsonl records whose meta.pile_set_name is one of these",
    )
    p.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="bad records: stop (default) or skip and count them",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue in a non-empty output folder, keeping completed shards",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="delete this tool's files in a non-empty output folder first",
    )
    p.add_argument("--seed", type=int, default=0, help="recorded in the manifest")
    p.add_argument(
        "--input-shard",
        default=None,
        metavar="I/N",
        help="run job I of N (0-based): the I-th contiguous slice of the sorted input files;"
        " writes part-IIIII-of-NNNNN-* files, joined by tools/merge_manifests.py",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv``, run, return the exit code (0 ok, 2 bad arguments/inputs)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else 2
    opts = Options(
        inputs=list(args.input),
        output=args.output,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        json_key=args.json_key,
        pile_set_names=args.pile_set_name,
        on_error=args.on_error,
        resume=args.resume,
        overwrite=args.overwrite,
        seed=args.seed,
        eod_token=args.eod_token,
    )
    try:
        if args.input_shard is not None:
            opts.input_shard = parse_input_shard(args.input_shard)
        run(opts)
    except PreprocessError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0
