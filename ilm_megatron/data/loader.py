"""Deterministic, exactly resumable loading of packed token shards (see ``docs/data.md``).

Reads the folders written by :mod:`ilm_megatron.data.preprocess` (``shard-NNNNNN.tar`` +
``manifest.json``) directly with :mod:`tarfile` and NumPy (random access by member offset).

Sample order (a pure function of ``(seed, epoch, rank, world_size)``):

* **Epoch order** of one dataset: the shards are permuted with a generator seeded by
  ``(seed, salt, epoch)``; then the samples inside each shard are permuted with a generator seeded
  by ``(seed, salt, epoch, shard)``; the epoch order is the concatenation (shard-local, so reads
  stay within one file at a time). ``salt`` is the dataset's index in a blend (0 when alone).
  With ``shuffle=False`` the epoch order is the natural sample order.
* **Ranks**: the epoch order is cut into ``world_size`` contiguous blocks whose sizes differ by at
  most one (``numpy.array_split``); rank ``r`` reads block ``r``. Every sample of an epoch is read
  exactly once across ranks. A rank's *stream* is the concatenation of its blocks of epochs
  0, 1, 2, ... (infinite unless ``num_epochs`` is given); batches may span an epoch boundary.
* **Blending**: sample ``k`` of a rank's blended stream comes from the dataset ``i`` maximizing
  ``w_i * (k + 1) - c_i`` (``w`` normalized weights, ``c_i`` samples already taken from ``i``, ties
  to the lowest index); it is the next sample of that dataset's own stream. After ``k`` samples
  every ``|c_i - w_i * k| <= 1``-ish (at most one sample off per dataset in practice).
* **Workers**: the stream is cut into items (batches of ``batch_size``, or single samples); torch
  DataLoader worker ``w`` of ``W`` produces items ``j`` with ``j % W == w``, which is exactly the
  round-robin order in which ``torch.utils.data.DataLoader`` (``in_order=True``) returns them, so
  the output does not depend on ``num_workers``.

Resume: the state is the number of samples of the stream *consumed by the training loop* (counted
by :class:`StatefulLoader` when it hands a batch over, never by prefetching workers) and the count
per blended dataset. A restarted loader starts its stream there without reading skipped samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ilm_megatron.errors import UserError

MANIFEST_NAME = "manifest.json"
FIELD_SUFFIX = ".tokens.npy"
STATE_VERSION = 1
SPLITS = ("train", "val", "all")
_OPEN_SHARDS = 4

DataSpec = str | os.PathLike | Sequence[tuple[str | os.PathLike, float]]


class DataError(UserError, ValueError):
    """A dataset folder, manifest or shard is missing, malformed, empty or corrupt (the one-line
    message names it)."""


class ManifestMismatchError(DataError):
    """The manifest does not match the model/run configuration (vocab size, tokenizer, seq_len)."""


# ---------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Manifest:
    """The validated ``manifest.json`` of one shards folder.

    Attributes:
        folder: the shards folder.
        path: the manifest file.
        seq_len: sequence length; each sample holds ``seq_len + 1`` tokens.
        dtype: NumPy dtype of the stored tokens (``<u2`` or ``<u4``).
        samples: total number of samples.
        shard_names: shard file names, in order.
        shard_counts: samples per shard, in order (sum = ``samples``).
        shard_sha256: recorded sha256 of each shard file.
        vocab_size: tokenizer vocabulary size.
        tokenizer_fingerprint: sha256 of the tokenizer definition.
        tokenizer_name: tokenizer name.
        raw: the whole manifest dict.
    """

    folder: Path
    path: Path
    seq_len: int
    dtype: np.dtype
    samples: int
    shard_names: tuple[str, ...]
    shard_counts: tuple[int, ...]
    shard_sha256: tuple[str, ...]
    vocab_size: int
    tokenizer_fingerprint: str
    tokenizer_name: str
    raw: dict

    @property
    def shard_starts(self) -> tuple[int, ...]:
        """Global index of the first sample of each shard."""
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.shard_counts)[:-1]]))

    def shard_path(self, index: int) -> Path:
        """The shard file holding global sample ``index``."""
        if not 0 <= index < self.samples:
            raise IndexError(f"sample {index} out of range for {self.samples} samples")
        shard = int(np.searchsorted(np.cumsum(self.shard_counts), index, side="right"))
        return self.folder / self.shard_names[shard]

    def digest(self) -> str:
        """Short identity of the dataset: sha256 over the shard sha256s (16 hex digits)."""
        return hashlib.sha256("".join(self.shard_sha256).encode()).hexdigest()[:16]


def _need(cond: bool, path: Path, msg: str) -> None:
    if not cond:
        raise DataError(f"{path}: invalid manifest: {msg}")


def load_manifest(dataset_dir: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Read and validate ``dataset_dir/manifest.json``.

    Args:
        dataset_dir: a folder written by ``tools/preprocess_data.py``.
        check_files: also check that every listed shard file exists.

    Raises:
        DataError: missing folder/manifest/shard, unreadable JSON, missing or inconsistent keys;
            the message names the folder or file.
    """
    folder = Path(dataset_dir)
    if not folder.is_dir():
        raise DataError(f"dataset folder not found: {folder}")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (incomplete or not a shards folder)")
    try:
        raw = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable manifest: {exc}") from None
    _need(isinstance(raw, dict), path, "not a JSON object")
    for key in ("format_version", "seq_len", "sample_len", "dtype", "samples", "shards"):
        _need(key in raw, path, f"missing key {key!r}")
    _need(raw["format_version"] == 1, path, f"unsupported format_version {raw['format_version']}")
    seq_len, samples = raw["seq_len"], raw["samples"]
    _need(isinstance(seq_len, int) and seq_len > 0, path, f"bad seq_len {seq_len!r}")
    _need(raw["sample_len"] == seq_len + 1, path, "sample_len != seq_len + 1")
    _need(raw["dtype"] in ("<u2", "<u4"), path, f"unsupported dtype {raw['dtype']!r}")
    _need(isinstance(samples, int) and samples >= 0, path, f"bad samples {samples!r}")
    tok = raw.get("tokenizer")
    _need(isinstance(tok, dict), path, "missing key 'tokenizer'")
    for key in ("vocab_size", "fingerprint", "name"):
        _need(key in tok, path, f"missing key 'tokenizer.{key}'")
    shards = raw["shards"]
    _need(isinstance(shards, list), path, "'shards' is not a list")
    names, counts, shas = [], [], []
    for i, s in enumerate(shards):
        ok = isinstance(s, dict) and all(k in s for k in ("name", "samples", "sha256"))
        _need(ok, path, f"shard entry {i} lacks name/samples/sha256")
        _need(isinstance(s["samples"], int) and s["samples"] > 0, path, f"shard {i}: bad samples")
        _need(Path(s["name"]).name == s["name"], path, f"shard {i}: bad name {s['name']!r}")
        names.append(s["name"])
        counts.append(s["samples"])
        shas.append(s["sha256"])
    _need(sum(counts) == samples, path, f"shard sample counts sum to {sum(counts)} != {samples}")
    if check_files:
        for name in names:
            if not (folder / name).is_file():
                raise DataError(f"{folder / name}: shard listed in {path} is missing")
    return Manifest(
        folder=folder,
        path=path,
        seq_len=seq_len,
        dtype=np.dtype(raw["dtype"]),
        samples=samples,
        shard_names=tuple(names),
        shard_counts=tuple(counts),
        shard_sha256=tuple(shas),
        vocab_size=int(tok["vocab_size"]),
        tokenizer_fingerprint=str(tok["fingerprint"]),
        tokenizer_name=str(tok["name"]),
        raw=raw,
    )


def check_manifest(
    dataset_dir: str | os.PathLike,
    vocab_size: int,
    tokenizer_fingerprint: str | None = None,
    seq_len: int | None = None,
) -> Manifest:
    """Check at training start that a dataset matches the model configuration.

    Args:
        dataset_dir: shards folder.
        vocab_size: the model's vocabulary size; must equal the manifest's.
        tokenizer_fingerprint: if given, must equal ``manifest.tokenizer.fingerprint``.
        seq_len: if given, must equal the manifest's ``seq_len``.

    Returns:
        The validated :class:`Manifest`.

    Raises:
        ManifestMismatchError: naming the model value, the manifest value and the manifest path.
        DataError: the folder or manifest is missing or invalid.
    """
    m = load_manifest(dataset_dir, check_files=False)
    if m.vocab_size != vocab_size:
        raise ManifestMismatchError(
            f"vocab size mismatch: model config has {vocab_size}, manifest {m.path} has"
            f" {m.vocab_size} (tokenizer {m.tokenizer_name!r})"
        )
    if tokenizer_fingerprint is not None and m.tokenizer_fingerprint != tokenizer_fingerprint:
        raise ManifestMismatchError(
            f"tokenizer fingerprint mismatch: expected {tokenizer_fingerprint}, manifest {m.path}"
            f" has {m.tokenizer_fingerprint} (tokenizer {m.tokenizer_name!r})"
        )
    if seq_len is not None and m.seq_len != seq_len:
        raise ManifestMismatchError(
            f"seq_len mismatch: model config has {seq_len}, manifest {m.path} has {m.seq_len}"
        )
    return m


def verify_shards(manifest: Manifest) -> None:
    """Hash every shard and compare with the manifest; :class:`DataError` naming a bad file."""
    for name, sha in zip(manifest.shard_names, manifest.shard_sha256):
        p = manifest.folder / name
        h = hashlib.sha256()
        try:
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        except OSError as exc:
            raise DataError(f"{p}: cannot read shard: {exc}") from None
        if h.hexdigest() != sha:
            raise DataError(f"{p}: sha256 mismatch with {manifest.path} (corrupt shard)")


def split_range(samples: int, split: str, val_fraction: float) -> tuple[int, int]:
    """Global sample range ``[lo, hi)`` of a split.

    ``val`` is the last ``max(1, round(val_fraction * samples))`` samples (when
    ``val_fraction > 0``), ``train`` the rest, ``all`` everything; train and val are disjoint.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = max(1, round(val_fraction * samples)) if val_fraction > 0 else 0
    if split == "all":
        return 0, samples
    if split == "val":
        if n_val == 0:
            raise ValueError("split='val' needs val_fraction > 0 (or use a separate val folder)")
        return samples - n_val, samples
    return 0, samples - n_val


# ------------------------------------------------------------------------------------- order


class _Order:
    """Rank stream of one dataset: position ``p`` -> global sample index (see module docstring)."""

    def __init__(
        self,
        m: Manifest,
        lo: int,
        hi: int,
        seed: int,
        salt: int,
        rank: int,
        world_size: int,
        shuffle: bool,
    ) -> None:
        starts, counts = [], []
        for s, c in zip(m.shard_starts, m.shard_counts):
            a, b = max(s, lo), min(s + c, hi)
            if a < b:
                starts.append(a)
                counts.append(b - a)
        self.starts = np.array(starts, dtype=np.int64)
        self.counts = np.array(counts, dtype=np.int64)
        n = hi - lo
        base, extra = divmod(n, world_size)
        self.rank_len = base + (1 if rank < extra else 0)
        self.rank_start = rank * base + min(rank, extra)
        if self.rank_len == 0:
            raise DataError(f"{m.folder}: {n} sample(s) cannot be split over {world_size} ranks")
        self.seed, self.salt, self.shuffle = seed, salt, shuffle
        self._epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)
        self._cum = np.zeros(1, dtype=np.int64)
        self._local: OrderedDict[int, np.ndarray] = OrderedDict()

    def _set_epoch(self, epoch: int) -> None:
        n_units = len(self.counts)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.salt, epoch, 0])
            self._perm = rng.permutation(n_units)
        else:
            self._perm = np.arange(n_units)
        self._cum = np.concatenate([[0], np.cumsum(self.counts[self._perm])])
        self._local.clear()
        self._epoch = epoch

    def epoch_of(self, pos: int) -> int:
        """Epoch of stream position ``pos``."""
        return pos // self.rank_len

    def sample(self, pos: int) -> int:
        """Global sample index at position ``pos`` of this rank's stream."""
        epoch, off = divmod(pos, self.rank_len)
        q = self.rank_start + off
        if epoch != self._epoch:
            self._set_epoch(epoch)
        u = int(np.searchsorted(self._cum, q, side="right")) - 1
        unit = int(self._perm[u])
        within = q - int(self._cum[u])
        if not self.shuffle:
            return int(self.starts[unit]) + within
        local = self._local.get(unit)
        if local is None:
            rng = np.random.default_rng([self.seed, self.salt, epoch, 1, unit])
            local = rng.permutation(int(self.counts[unit]))
            self._local[unit] = local
            if len(self._local) > 4:
                self._local.popitem(last=False)
        return int(self.starts[unit]) + int(local[within])


class _Schedule:
    """Deterministic weighted interleaving: which dataset the next sample comes from."""

    def __init__(self, weights: Sequence[float], k: int, counts: Sequence[int]) -> None:
        total = float(sum(weights))
        self.p = [w / total for w in weights]
        self.k = k
        self.counts = list(counts)

    def next(self) -> tuple[int, int]:
        """``(dataset index, position in that dataset's stream)`` of the next sample."""
        if len(self.p) == 1:
            i = 0
        else:
            k1 = self.k + 1
            i = max(range(len(self.p)), key=lambda j: (self.p[j] * k1 - self.counts[j], -j))
        pos = self.counts[i]
        self.counts[i] += 1
        self.k += 1
        return i, pos


# ------------------------------------------------------------------------------------ reading


class _ShardReader:
    """Random access to the samples of one dataset (member offsets indexed per shard, lazily)."""

    def __init__(self, m: Manifest) -> None:
        self.m = m
        self.starts = np.array(m.shard_starts, dtype=np.int64)
        self._index: dict[int, np.ndarray] = {}
        self._files: OrderedDict[int, Any] = OrderedDict()
        self._nbytes = m.dtype.itemsize * (m.seq_len + 1)

    def _build_index(self, shard: int) -> np.ndarray:
        path = self.m.folder / self.m.shard_names[shard]
        first, count = int(self.starts[shard]), self.m.shard_counts[shard]
        table = np.full((count, 2), -1, dtype=np.int64)
        seen = 0
        try:
            with tarfile.open(path, "r:") as tf:
                for info in tf:
                    key, _, suffix = info.name.partition(".")
                    if "." + suffix != FIELD_SUFFIX or not key.isdigit() or not info.isfile():
                        raise DataError(f"{path}: unexpected member {info.name!r}")
                    local = int(key) - first
                    if not 0 <= local < count or table[local, 0] >= 0:
                        raise DataError(f"{path}: member {info.name!r} does not belong here")
                    table[local] = (info.offset_data, info.size)
                    seen += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read shard: {exc}") from None
        if seen != count:
            raise DataError(f"{path}: holds {seen} samples, manifest {self.m.path} says {count}")
        return table

    def _file(self, shard: int) -> Any:
        fh = self._files.get(shard)
        if fh is None:
            path = self.m.folder / self.m.shard_names[shard]
            try:
                fh = open(path, "rb")  # noqa: SIM115 (kept open in a small LRU cache)
            except OSError as exc:
                raise DataError(f"{path}: cannot open shard: {exc}") from None
            self._files[shard] = fh
            if len(self._files) > _OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return fh

    def read(self, index: int) -> np.ndarray:
        """Tokens of global sample ``index``: int64 array, shape ``(seq_len + 1,)``."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        table = self._index.get(shard)
        if table is None:
            table = self._index[shard] = self._build_index(shard)
        offset, size = (int(x) for x in table[index - int(self.starts[shard])])
        fh = self._file(shard)
        path = self.m.folder / self.m.shard_names[shard]
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise DataError(f"{path}: truncated shard (sample {index})")
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{path}: sample {index}: bad .npy member: {exc}") from None
        if arr.dtype != self.m.dtype or arr.shape != (self.m.seq_len + 1,):
            raise DataError(
                f"{path}: sample {index}: got {arr.dtype.str} {arr.shape}, manifest says"
                f" {self.m.dtype.str} ({self.m.seq_len + 1},)"
            )
        return arr.astype(np.int64)

    def close(self) -> None:
        """Close the open shard files."""
        for fh in self._files.values():
            fh.close()
        self._files.clear()


# ------------------------------------------------------------------------------------ dataset


def _parse_spec(data: DataSpec) -> tuple[list[Path], list[float]]:
    if isinstance(data, (str, os.PathLike)):
        return [Path(data)], [1.0]
    dirs, weights = [], []
    for item in data:
        d, w = item
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
            raise ValueError(f"blend weight of {d} must be a positive number, got {w!r}")
        dirs.append(Path(d))
        weights.append(float(w))
    if not dirs:
        raise ValueError("empty blend")
    return dirs, weights


class ShardDataset(IterableDataset):
    """One rank's deterministic stream of samples or batches from one or several shard folders.

    Use with ``DataLoader(ds, batch_size=None, num_workers=W)``: items come out in stream order
    for any ``W`` (worker ``w`` produces items ``j % W == w``).

    Items (``batch_size=None``): ``{"tokens": LongTensor (seq_len+1,), "id": int, "source": int}``.
    Items (``batch_size=b``): ``{"tokens": LongTensor (b, seq_len+1), "ids": LongTensor (b,),
    "source": LongTensor (b,)}``; the last batch of a finite stream may be shorter. ``id`` is the
    global sample index in its folder (the shard member key), ``source`` the folder's index in
    the blend.

    Args:
        data: a shards folder, or a blend ``[(folder, weight), ...]`` (positive weights).
        rank, world_size: data-parallel rank and size.
        seed: non-negative shuffle seed.
        batch_size: ``None`` for single samples, else samples per item.
        split: ``"train"``, ``"val"`` or ``"all"`` (see :func:`split_range`).
        val_fraction: fraction of each folder's samples held out (the last ones) for ``"val"``.
        shuffle: shuffle per epoch (``False``: natural order, e.g. for validation).
        num_epochs: stop after this many epochs (single folder only); ``None``: infinite.
        start: stream position to start at (samples already consumed).
        start_counts: samples already consumed per folder (required for a blend with
            ``start > 0``; default for one folder: ``[start]``).
        verify_checksums: hash all shards against the manifest at construction.
    """

    def __init__(
        self,
        data: DataSpec,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batch_size: int | None = None,
        split: str = "train",
        val_fraction: float = 0.0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        start: int = 0,
        start_counts: Sequence[int] | None = None,
        verify_checksums: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dirs, self.weights = _parse_spec(data)
        if num_epochs is not None and (len(self.dirs) > 1 or num_epochs < 1):
            raise ValueError("num_epochs needs a single folder and a value >= 1")
        self.manifests = [load_manifest(d) for d in self.dirs]
        for m in self.manifests:
            if m.samples == 0:
                raise DataError(f"{m.folder}: the dataset holds no samples ({m.path} lists none)")
        m0 = self.manifests[0]
        for m in self.manifests[1:]:
            if m.seq_len != m0.seq_len:
                raise DataError(f"blend: seq_len {m.seq_len} of {m.path} != {m0.seq_len}")
            if m.tokenizer_fingerprint != m0.tokenizer_fingerprint:
                raise DataError(f"blend: tokenizer of {m.path} differs from that of {m0.path}")
        if verify_checksums:
            for m in self.manifests:
                verify_shards(m)
        self.seq_len = m0.seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batch_size, self.split, self.val_fraction = batch_size, split, val_fraction
        self.shuffle, self.num_epochs = shuffle, num_epochs
        self.orders = []
        for i, m in enumerate(self.manifests):
            lo, hi = split_range(m.samples, split, val_fraction)
            self.orders.append(_Order(m, lo, hi, seed, i, rank, world_size, shuffle))
        self.start = int(start)
        counts = start_counts
        if counts is None and (len(self.dirs) == 1 or self.start == 0):
            counts = [self.start] + [0] * (len(self.dirs) - 1)
        if counts is None or len(counts) != len(self.dirs) or sum(counts) != self.start:
            raise ValueError(f"start_counts {start_counts} do not match start {start}")
        self.start_counts = [int(c) for c in counts]

    @property
    def samples_per_epoch(self) -> list[int]:
        """Samples per epoch of this rank, per folder."""
        return [o.rank_len for o in self.orders]

    def remaining(self) -> int | None:
        """Samples left in the stream from ``start`` (``None``: infinite)."""
        if self.num_epochs is None:
            return None
        return max(0, self.orders[0].rank_len * self.num_epochs - self.start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        readers = [_ShardReader(m) for m in self.manifests]
        sched = _Schedule(self.weights, self.start, self.start_counts)
        left = self.remaining()
        size = self.batch_size or 1
        item = 0
        try:
            while left is None or left > 0:
                n = size if left is None else min(size, left)
                picks = [sched.next() for _ in range(n)]
                if left is not None:
                    left -= n
                if item % nw == wid:
                    yield self._make(picks, readers)
                item += 1
        finally:
            for r in readers:
                r.close()

    def _make(self, picks: list[tuple[int, int]], readers: list[_ShardReader]) -> dict[str, Any]:
        ids = [self.orders[i].sample(pos) for i, pos in picks]
        rows = [readers[i].read(g) for (i, _), g in zip(picks, ids)]
        if self.batch_size is None:
            return {"tokens": torch.from_numpy(rows[0]), "id": ids[0], "source": picks[0][0]}
        return {
            "tokens": torch.from_numpy(np.stack(rows)),
            "ids": torch.tensor(ids, dtype=torch.long),
            "source": torch.tensor([i for i, _ in picks], dtype=torch.long),
        }


# ------------------------------------------------------------------------------------- loader


class StatefulLoader:
    """Batches of one data-parallel rank with exact mid-epoch resume.

    Iterating yields ``{"tokens": LongTensor (b, seq_len+1), "ids": LongTensor (b,),
    "source": LongTensor (b,)}`` (see :class:`ShardDataset`); inputs are ``tokens[:, :-1]``, labels
    ``tokens[:, 1:]``. The stream is infinite unless ``num_epochs`` is given. Each ``iter()``
    starts a fresh torch DataLoader at the current state; :meth:`state_dict` counts the batches
    handed to the caller (not those prefetched by workers), so saving it after a training step
    and loading it into a new loader continues with exactly the next batch.

    Args:
        data: a shards folder or a blend ``[(folder, weight), ...]``.
        batch_size: samples per batch (per rank).
        rank, world_size: data-parallel rank and size.
        num_workers: torch DataLoader worker processes (0: in the calling process); the batch
            sequence does not depend on it.
        seed: shuffle seed (>= 0).
        split, val_fraction, shuffle, num_epochs, verify_checksums: see :class:`ShardDataset`.
        prefetch_factor: batches prefetched per worker (with ``num_workers > 0``).
        pin_memory: pin batches (CUDA hosts).
    """

    def __init__(
        self,
        data: DataSpec,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        split: str = "train",
        val_fraction: float = 0.0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        verify_checksums: bool = False,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._kw: dict[str, Any] = dict(
            data=data,
            rank=rank,
            world_size=world_size,
            seed=seed,
            batch_size=batch_size,
            split=split,
            val_fraction=val_fraction,
            shuffle=shuffle,
            num_epochs=num_epochs,
        )
        self._ds = ShardDataset(**self._kw, verify_checksums=verify_checksums)
        self.num_workers, self.prefetch_factor, self.pin_memory = (
            num_workers,
            prefetch_factor,
            pin_memory,
        )
        self._consumed = 0
        self._counts = [0] * len(self._ds.dirs)

    @property
    def seq_len(self) -> int:
        """Sequence length (batches hold ``seq_len + 1`` tokens per row)."""
        return self._ds.seq_len

    @property
    def samples_per_epoch(self) -> list[int]:
        """Samples per epoch of this rank, per folder."""
        return self._ds.samples_per_epoch

    @property
    def manifests(self) -> list[Manifest]:
        """The manifest of each folder, in blend order (a batch's ``source`` indexes it)."""
        return list(self._ds.manifests)

    @property
    def samples_consumed(self) -> int:
        """Samples of this rank's stream handed to the caller so far."""
        return self._consumed

    @property
    def epoch(self) -> int:
        """Current epoch of the first (or only) folder."""
        return self._ds.orders[0].epoch_of(self._counts[0])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = ShardDataset(**self._kw, start=self._consumed, start_counts=list(self._counts))
        nw = self.num_workers
        dl = DataLoader(
            ds,
            batch_size=None,
            num_workers=nw,
            prefetch_factor=self.prefetch_factor if nw > 0 else None,
            pin_memory=self.pin_memory,
            in_order=True,
        )
        n_src = len(self._counts)
        for batch in dl:
            self._consumed += len(batch["ids"])
            per_src = torch.bincount(batch["source"], minlength=n_src).tolist()
            self._counts = [c + d for c, d in zip(self._counts, per_src)]
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable resume state (samples consumed, per folder, plus identity checks)."""
        ds = self._ds
        return {
            "version": STATE_VERSION,
            "seed": ds.seed,
            "rank": ds.rank,
            "world_size": ds.world_size,
            "split": ds.split,
            "val_fraction": ds.val_fraction,
            "shuffle": ds.shuffle,
            "samples_consumed": self._consumed,
            "sources": [
                {
                    "folder": str(m.folder),
                    "digest": m.digest(),
                    "weight": w,
                    "consumed": c,
                    "epoch": o.epoch_of(c),
                    "epoch_offset": c % o.rank_len,
                }
                for m, w, c, o in zip(ds.manifests, ds.weights, self._counts, ds.orders)
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; ``ValueError`` if it belongs to a different setup."""
        ds = self._ds
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        for key in ("seed", "rank", "world_size", "split", "val_fraction", "shuffle"):
            if state[key] != getattr(ds, key):
                raise ValueError(
                    f"loader state has {key}={state[key]!r}, this loader {getattr(ds, key)!r}"
                )
        srcs = state["sources"]
        if len(srcs) != len(ds.manifests):
            raise ValueError(
                f"loader state has {len(srcs)} source(s), this loader {len(ds.manifests)}"
            )
        for s, m, w in zip(srcs, ds.manifests, ds.weights):
            if s["digest"] != m.digest():
                raise ValueError(f"loader state source {s['folder']} is not the dataset {m.folder}")
            if s["weight"] != w:
                raise ValueError(f"loader state weight {s['weight']} of {m.folder} != {w}")
        counts = [int(s["consumed"]) for s in srcs]
        if sum(counts) != state["samples_consumed"]:
            raise ValueError("inconsistent loader state: per-source counts do not add up")
        self._consumed = int(state["samples_consumed"])
        self._counts = counts
