"""Reader and writer of Megatron-LM indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

This is the ``MMapIndexedDataset`` layout of Megatron-LM, as implemented here (all integers
little-endian)::

    PREFIX.idx
        magic            9 bytes   b"MMIDIDX\\x00\\x00"
        version          uint64    1
        dtype code       uint8     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                   7 float32, 8 uint16
        sequence count   uint64    S
        document count   uint64    D  (length of the document index array)
        sequence_lengths int32[S]  tokens per sequence
        sequence_ptrs    int64[S]  byte offset of each sequence in PREFIX.bin
        document_indices int64[D]  sequence index where each document starts, then S at the end
                                   (D = documents + 1, first entry 0)
    PREFIX.bin
        the token ids of all sequences, back to back, in the dtype above

A document is the concatenation of sequences ``document_indices[d] .. document_indices[d+1]-1``
(one sequence per document when Megatron's preprocessing does not split sentences). Optional
trailing fields of newer multimodal versions (sequence modes) are not supported: the ``.idx`` file
must end right after the document indices.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
_HEADER = struct.Struct("<9sQBQQ")


class IndexedDatasetError(ValueError):
    """A malformed or truncated ``.idx`` / ``.bin`` file; the message names the file."""


def dtype_code(dtype: np.dtype | type) -> int:
    """The Megatron dtype code of ``dtype``; raises :class:`IndexedDatasetError` if unsupported."""
    dt = np.dtype(dtype)
    for code, d in DTYPE_CODES.items():
        if d == dt:
            return code
    raise IndexedDatasetError(f"dtype {dtype} has no Megatron indexed dataset code")


class IndexedDataset:
    """Read-only view of ``PREFIX.bin``/``PREFIX.idx``; tokens are memory-mapped, not loaded.

    Raises:
        IndexedDatasetError: missing file, bad magic/version/dtype code, sizes that do not match
            the header, pointers past the end of ``.bin`` (every message names the file).
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        self.idx_path = Path(self.prefix + ".idx")
        self.bin_path = Path(self.prefix + ".bin")
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise IndexedDatasetError(f"{p}: no such file")
        raw = self.idx_path.read_bytes()
        where = str(self.idx_path)
        if len(raw) < _HEADER.size:
            raise IndexedDatasetError(f"{where}: truncated header ({len(raw)} bytes)")
        magic, version, code, n_seq, n_doc = _HEADER.unpack_from(raw, 0)
        if magic != MAGIC:
            raise IndexedDatasetError(f"{where}: bad magic {magic!r} (expected {MAGIC!r})")
        if version != VERSION:
            raise IndexedDatasetError(f"{where}: unsupported version {version}")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{where}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        expected = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if len(raw) != expected:
            state = "truncated" if len(raw) < expected else "has trailing data"
            raise IndexedDatasetError(
                f"{where}: {state}: {len(raw)} bytes, header implies {expected}"
            )
        off = _HEADER.size
        self.sequence_lengths = np.frombuffer(raw, "<i4", n_seq, off).astype(np.int64)
        off += 4 * n_seq
        self.sequence_pointers = np.frombuffer(raw, "<i8", n_seq, off).copy()
        off += 8 * n_seq
        self.document_indices = np.frombuffer(raw, "<i8", n_doc, off).copy()
        di = self.document_indices
        if n_doc < 1 or di[0] != 0 or di[-1] != n_seq or np.any(np.diff(di) < 0):
            raise IndexedDatasetError(f"{where}: invalid document indices")
        if np.any(self.sequence_lengths < 0):
            raise IndexedDatasetError(f"{where}: negative sequence length")
        bin_size = self.bin_path.stat().st_size
        ends = self.sequence_pointers + self.sequence_lengths * self.dtype.itemsize
        if n_seq and (int(ends.max()) > bin_size or int(self.sequence_pointers.min()) < 0):
            raise IndexedDatasetError(
                f"{self.bin_path}: truncated: {bin_size} bytes, the index needs {int(ends.max())}"
            )
        if bin_size % self.dtype.itemsize:
            raise IndexedDatasetError(
                f"{self.bin_path}: size {bin_size} is not a multiple of {self.dtype.itemsize}"
            )
        self._bin = (
            np.memmap(self.bin_path, dtype=np.uint8, mode="r")
            if bin_size
            else np.zeros(0, np.uint8)
        )

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        """Number of documents (``len(document_indices) - 1``)."""
        return len(self.document_indices) - 1

    def sequence(self, i: int) -> np.ndarray:
        """Tokens of sequence ``i`` (a copy, in the file dtype)."""
        start = int(self.sequence_pointers[i])
        nbytes = int(self.sequence_lengths[i]) * self.dtype.itemsize
        return np.frombuffer(self._bin[start : start + nbytes].tobytes(), dtype=self.dtype)

    def document(self, d: int) -> np.ndarray:
        """Tokens of document ``d``: its sequences concatenated."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if hi - lo == 1:
            return self.sequence(lo)
        parts = [self.sequence(i) for i in range(lo, hi)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def iter_documents(self) -> Iterator[np.ndarray]:
        """Tokens of each document in order."""
        for d in range(self.num_documents):
            yield self.document(d)


def write_indexed_dataset(
    prefix: str | Path, documents: Sequence[Sequence[Sequence[int]]], dtype: np.dtype | type
) -> None:
    """Write ``PREFIX.bin``/``PREFIX.idx``; ``documents[d]`` is the list of its sequences' tokens.

    Used to build test fixtures; produces the layout documented in this module.
    """
    dt = np.dtype(dtype)
    code = dtype_code(dt)
    dt = DTYPE_CODES[code]
    lengths: list[int] = []
    pointers: list[int] = []
    doc_idx = [0]
    offset = 0
    with open(str(prefix) + ".bin", "wb") as fh:
        for doc in documents:
            for seq in doc:
                arr = np.asarray(seq).astype(dt)
                fh.write(arr.tobytes())
                lengths.append(len(arr))
                pointers.append(offset)
                offset += arr.nbytes
            doc_idx.append(len(lengths))
    with open(str(prefix) + ".idx", "wb") as fh:
        fh.write(_HEADER.pack(MAGIC, VERSION, code, len(lengths), len(doc_idx)))
        fh.write(np.asarray(lengths, dtype="<i4").tobytes())
        fh.write(np.asarray(pointers, dtype="<i8").tobytes())
        fh.write(np.asarray(doc_idx, dtype="<i8").tobytes())
