"""Tokenize text corpora (the Pile: ``.jsonl``, ``.jsonl.zst``, ``.txt``) into WebDataset shards.

Documents are read in a deterministic order (input files sorted by path, lines in file order),
tokenized (in parallel worker processes when ``--workers > 1``), followed by the EOD token,
concatenated and cut into samples of ``seq_len + 1`` tokens. Samples are written to
``shard-NNNNNN.tar`` files of ``--samples-per-shard`` samples; ``manifest.json`` is written last.
Workers only tokenize; reading, packing and writing happen in order in the parent process, so the
output is byte-identical whatever the worker count. See ``docs/data.md`` for the format.

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
_BATCH_DOCS = 64
_BATCH_CHARS = 1 << 22
_READ_CHUNK = 1 << 20
_MAX_REPORTED = 20


class PreprocessError(Exception):
    """Bad arguments or bad inputs; :func:`main` prints the message and exits with code 2."""


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-000000.tar``, ``shard-000001.tar``, ..."""
    return f"shard-{index:06d}.tar"


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


def iter_documents(files: Sequence[Path], opts: Options, stats: Stats) -> Iterator[str]:
    """Texts of all good documents of ``files`` in order; bad records handled per ``on_error``."""
    names = set(opts.pile_set_names) if opts.pile_set_names else None
    for path in files:
        for item in _iter_file(path, opts.json_key, names):
            if item is None:
                stats.filtered += 1
            elif isinstance(item, _BadRecordError):
                stats.errors[item.kind] += 1
                where = f"{path}:{item.line}: {item.kind}: {item.detail}"
                if opts.on_error == "fail":
                    raise PreprocessError(f"{where} (pass --on-error skip to skip bad records)")
                if stats.reported < _MAX_REPORTED:
                    print(f"{PROG}: warning: skipped {where}", file=sys.stderr)
                stats.reported += 1
            else:
                stats.documents += 1
                yield item


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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _atomic_write(path: Path, data: bytes) -> None:
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


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _npy_bytes(row: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.save(bio, row, allow_pickle=False)
    return bio.getvalue()


def _tar_bytes(samples: list[tuple[str, bytes]]) -> bytes:
    """A deterministic tar (ustar, mtime 0, uid/gid 0) with one member per sample."""
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


class _ShardWriter:
    """Collects samples into shards, writes each atomically and records it in ``progress.json``."""

    def __init__(
        self, out: Path, opts: Options, dtype: np.dtype, config: dict, done: dict[str, str]
    ) -> None:
        self.out, self.opts, self.dtype, self.config, self.done = out, opts, dtype, config, done
        self.pending: list[tuple[str, bytes]] = []
        self.shards: list[dict[str, Any]] = []
        self.samples = 0
        self.reused = 0

    def add(self, row: np.ndarray) -> None:
        self.pending.append((sample_key(self.samples), _npy_bytes(row.astype(self.dtype))))
        self.samples += 1
        if len(self.pending) >= self.opts.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = shard_name(len(self.shards))
        data = _tar_bytes(self.pending)
        digest = hashlib.sha256(data).hexdigest()
        if self.done.get(name) == digest:
            self.reused += 1  # --resume: identical shard already on disk
        else:
            _atomic_write(self.out / name, data)
        self.shards.append({"name": name, "samples": len(self.pending), "sha256": digest})
        self.pending = []
        progress = {"format_version": FORMAT_VERSION, "config": self.config, "shards": self.shards}
        _atomic_write(self.out / PROGRESS_NAME, _json_bytes(progress))


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


def _is_ours(name: str) -> bool:
    return (
        bool(_SHARD_RE.match(name))
        or name in (MANIFEST_NAME, PROGRESS_NAME)
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _prepare_output(out: Path, opts: Options, config: dict) -> dict[str, str]:
    """Check/clean the output folder; return ``{shard name: sha256}`` reusable under --resume."""
    if out.exists() and not out.is_dir():
        raise PreprocessError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted(os.listdir(out))
    if not entries:
        return {}
    if not (opts.resume or opts.overwrite):
        raise PreprocessError(f"output folder {out} is not empty (pass --resume or --overwrite)")
    foreign = [e for e in entries if not _is_ours(e)]
    if foreign:
        raise PreprocessError(
            f"output folder {out} holds files this tool did not write ({', '.join(foreign[:5])});"
            " refusing to touch it"
        )
    done: dict[str, str] = {}
    if opts.resume and PROGRESS_NAME in entries:
        try:
            progress = json.loads((out / PROGRESS_NAME).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise PreprocessError(f"cannot read {out / PROGRESS_NAME}: {exc}") from exc
        if progress.get("config") != config:
            raise PreprocessError(
                f"cannot resume in {out}: it was started with other inputs or settings"
                " (pass --overwrite to start again)"
            )
        for shard in progress.get("shards", []):
            path = out / shard["name"]
            if path.is_file() and _sha256_file(path) == shard["sha256"]:
                done[shard["name"]] = shard["sha256"]
    for e in entries:
        if e not in done:
            (out / e).unlink()
    return done


# ------------------------------------------------------------------------------------------- run


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
    files = find_inputs(opts.inputs)
    try:
        tok = load_tokenizer(opts.tokenizer, eod_token=opts.eod_token)
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from exc
    sources = [{"path": str(f), "size": f.stat().st_size, "sha256": _sha256_file(f)} for f in files]
    tokenizer_info = {
        "name": tok.name,
        "fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
    }
    dtype = token_dtype(tok.vocab_size)
    config = {
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
    out = opts.output
    done = _prepare_output(out, opts, config)
    stats = Stats()
    writer = _ShardWriter(out, opts, dtype, config, done)
    row_len = opts.seq_len + 1
    total_tokens = 0
    carry: list[np.ndarray] = []
    carry_len = 0

    def consume(arr: np.ndarray) -> None:
        nonlocal total_tokens, carry, carry_len
        total_tokens += len(arr)
        carry.append(arr)
        carry_len += len(arr)
        if carry_len < row_len:
            return
        buf = np.concatenate(carry)
        n = len(buf) // row_len
        for row in buf[: n * row_len].reshape(n, row_len):
            writer.add(row)
        rest = buf[n * row_len :]
        carry, carry_len = [rest], len(rest)

    from tqdm import tqdm

    show = sys.stderr.isatty() if opts.progress_bar is None else opts.progress_bar
    bar = tqdm(unit="doc", desc="tokenizing", disable=not show, file=sys.stderr)
    pool = None
    try:
        batches = _batches(iter_documents(files, opts, stats))
        if opts.workers == 1:
            for batch in batches:
                consume(_tokenize_batch(batch, tok))
                bar.update(len(batch))
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(opts.workers, _init_worker, (opts.tokenizer, opts.eod_token))
            window: deque = deque()
            for batch in batches:
                window.append((len(batch), pool.apply_async(_tokenize_batch, (batch,))))
                if len(window) >= 2 * opts.workers:
                    n, res = window.popleft()
                    consume(res.get())
                    bar.update(n)
            while window:
                n, res = window.popleft()
                consume(res.get())
                bar.update(n)
            pool.close()
            pool.join()
            pool = None
        writer.flush()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for e in os.listdir(out):
            if e.startswith(".") and e.endswith(".tmp"):
                (out / e).unlink()
        raise
    finally:
        bar.close()

    n_errors = sum(stats.errors.values())
    manifest = {
        "format_version": FORMAT_VERSION,
        "seq_len": opts.seq_len,
        "sample_len": row_len,
        "samples_per_shard": opts.samples_per_shard,
        "dtype": dtype.str,
        "field": SHARD_FIELD,
        "samples": writer.samples,
        "tokens": writer.samples * row_len,
        "tokens_total": total_tokens,
        "dropped_tail_tokens": carry_len,
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
    _atomic_write(out / MANIFEST_NAME, _json_bytes(manifest))
    if n_errors:
        counts = ", ".join(f"{k}={v}" for k, v in stats.errors.items() if v)
        print(f"{PROG}: skipped {n_errors} bad record(s): {counts}", file=sys.stderr)
    reused = f" ({writer.reused} reused)" if writer.reused else ""
    print(
        f"{PROG}: {stats.documents} documents, {total_tokens} tokens -> {writer.samples} samples"
        f" in {len(writer.shards)} shard(s){reused}, {carry_len} tail tokens dropped; {out}",
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
        run(opts)
    except PreprocessError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0
