"""Write and merge megatron indexed datasets (``<prefix>.bin`` + ``<prefix>.idx``) atomically.

The bytes are exactly those of megatron-core's ``IndexedDatasetBuilder`` (tests compare them),
so ``IndexedDataset`` / ``GPTDataset`` read the output. Two things differ on purpose:

* Memory: the builder keeps every sequence length as a Python int in a list (~36 bytes per
  sequence, for the whole corpus when merging). Here lengths live in compact ``array``s
  (4 + 8 bytes per sequence, per partition), and ``merge_indexed`` streams one input index at a
  time, so merging a 100 GB corpus holds one partition's index in memory, not the corpus'.
* Atomicity: data and index are written to ``*.tmp`` files, flushed to disk, then renamed
  (``.bin`` first, ``.idx`` last). A crash never leaves an ``.idx`` that looks valid next to a
  ``.bin`` it does not describe.

Layout of ``.idx`` (little endian): ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code ``<B``,
sequence count ``<Q``, document count ``<Q``, then ``int32[sequences]`` lengths,
``int64[sequences]`` byte pointers into ``.bin``, ``int64[documents]`` document indices
(sequence index where each document ends, starting with 0).
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = len(_HEADER) + 8 + 1 + 8 + 8
# megatron.core.datasets.indexed_dataset.DType codes (not imported: that loads torch).
_DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type:
    """The dtype megatron-core's ``DType.optimal_dtype`` picks: uint16 below 65500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def _fsync_close(f) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


def _commit(prefix: str) -> None:
    """Rename ``prefix.bin.tmp`` then ``prefix.idx.tmp`` into place: the index appears last."""
    os.replace(prefix + ".bin.tmp", prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")


def _write_index_header(f, dtype: type, sequence_count: int, document_count: int) -> None:
    f.write(_HEADER)
    f.write(struct.pack("<Q", 1))
    f.write(struct.pack("<B", _DTYPE_CODES[np.dtype(dtype).type]))
    f.write(struct.pack("<Q", sequence_count))
    f.write(struct.pack("<Q", document_count))


class IndexedWriter:
    """Append documents to ``prefix.bin.tmp``; ``finalize()`` writes the index and commits.

    A document is a list of sequences (one, or one per sentence with ``--split-sentences``).
    Memory: 12 bytes per sequence plus 8 per document, for this writer's documents only.
    """

    def __init__(self, prefix: str, dtype: type) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._data = open(prefix + ".bin.tmp", "wb")
        self._lengths = array("i")
        self._document_ends = array("q", [0])
        self.num_tokens = 0

    def add_documents(self, documents: Sequence[Sequence[Sequence[int]]]) -> None:
        """Append ``documents``: each a list of sequences, each a list of token ids."""
        lengths = [len(seq) for doc in documents for seq in doc]
        total = sum(lengths)
        flat = np.fromiter(
            chain.from_iterable(seq for doc in documents for seq in doc), dtype=self.dtype, count=total
        )
        self._data.write(flat.tobytes())
        self._append_index(lengths, [len(doc) for doc in documents])
        self.num_tokens += total

    def add_array_document(self, sequences: Sequence[Sequence[np.ndarray]]) -> None:
        """Append one document given as sequences of array pieces (the long-document path).

        Each sequence is a list of arrays written back to back, so a 100 MB document is never
        held as one token array.
        """
        lengths = []
        for pieces in sequences:
            for piece in pieces:
                self._data.write(np.ascontiguousarray(piece, dtype=self.dtype).tobytes())
            lengths.append(sum(len(piece) for piece in pieces))
        self._append_index(lengths, [len(sequences)])
        self.num_tokens += sum(lengths)

    def _append_index(self, lengths: list[int], sequences_per_document: list[int]) -> None:
        end = self._document_ends[-1]
        self._lengths.extend(lengths)
        for n in sequences_per_document:
            end += n
            self._document_ends.append(end)

    def finalize(self) -> None:
        """Write ``prefix.idx`` and rename both files into place."""
        _fsync_close(self._data)
        lengths = (
            np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
        )
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(self.prefix + ".idx.tmp", "wb") as f:
            _write_index_header(f, self.dtype.type, len(lengths), len(self._document_ends))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.frombuffer(self._document_ends, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        _commit(self.prefix)

    def abort(self) -> None:
        """Close and delete the temporary files (an interrupted partition leaves nothing)."""
        self._data.close()
        for suffix in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.prefix + suffix):
                os.remove(self.prefix + suffix)


class IndexReadError(ValueError):
    """An ``.idx`` file that is not a megatron indexed-dataset index."""


def read_index(prefix: str) -> tuple[type, np.ndarray, np.ndarray]:
    """Return ``(dtype, sequence_lengths int32[S], document_indices int64[D])`` of ``prefix.idx``."""
    path = prefix + ".idx"
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[: len(_HEADER)] != _HEADER:
            raise IndexReadError(f"{path} is not a megatron indexed-dataset index (bad header)")
        code = head[len(_HEADER) + 8]
        sequence_count, document_count = struct.unpack("<QQ", head[len(_HEADER) + 9 :])
        lengths = np.fromfile(f, dtype=np.int32, count=sequence_count)
        f.seek(sequence_count * 8, os.SEEK_CUR)
        document_indices = np.fromfile(f, dtype=np.int64, count=document_count)
    if len(lengths) != sequence_count or len(document_indices) != document_count:
        raise IndexReadError(f"{path} is truncated")
    return _CODE_DTYPES[code], lengths, document_indices


def merge_indexed(input_prefixes: Iterable[str], output_prefix: str) -> dict:
    """Concatenate indexed datasets in order into ``output_prefix`` (bytes as the builder's ``add_index``).

    Streams: one input index is in memory at a time (two passes over the indices, one over the
    data). Returns ``{"documents": D, "sequences": S, "tokens": T}``.
    Raises ``IndexReadError`` if the inputs' token dtypes differ or an index is unreadable.
    """
    input_prefixes = list(input_prefixes)
    dtype, sequence_count, document_count = None, 0, 1
    for prefix in input_prefixes:
        part_dtype, lengths, document_indices = read_index(prefix)
        if dtype is not None and part_dtype != dtype:
            raise IndexReadError(
                f"{prefix}.idx holds {part_dtype.__name__} tokens, the others {dtype.__name__}"
            )
        dtype = part_dtype
        sequence_count += len(lengths)
        document_count += len(document_indices) - 1
    if dtype is None:
        raise IndexReadError("nothing to merge: no input prefixes")
    itemsize = np.dtype(dtype).itemsize

    with open(output_prefix + ".bin.tmp", "wb") as data:
        for prefix in input_prefixes:
            with open(prefix + ".bin", "rb") as f:
                shutil.copyfileobj(f, data, 16 << 20)
        data.flush()
        os.fsync(data.fileno())

    tokens = 0
    with open(output_prefix + ".idx.tmp", "wb") as f:
        _write_index_header(f, dtype, sequence_count, document_count)
        for prefix in input_prefixes:
            f.write(read_index(prefix)[1].tobytes())
        byte_offset = 0
        for prefix in input_prefixes:
            lengths = read_index(prefix)[1].astype(np.int64)
            pointers = np.empty_like(lengths)
            if len(lengths):
                pointers[0] = 0
                np.cumsum(lengths[:-1], out=pointers[1:])
            f.write((pointers * itemsize + byte_offset).tobytes())
            byte_offset += int(lengths.sum()) * itemsize
            tokens += int(lengths.sum())
        f.write(np.zeros(1, np.int64).tobytes())
        sequence_offset = 0
        for prefix in input_prefixes:
            _, lengths, document_indices = read_index(prefix)
            f.write((document_indices[1:] + sequence_offset).tobytes())
            sequence_offset += len(lengths)
        f.flush()
        os.fsync(f.fileno())
    _commit(output_prefix)
    return {"documents": document_count - 1, "sequences": sequence_count, "tokens": tokens}
