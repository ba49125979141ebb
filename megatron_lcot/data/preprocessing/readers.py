"""Stream the records of one segment of one input unit, turning bad ones into ``Issue``s.

``read_segment`` yields, in input order, either ``Record(number, byte_offset, fields)`` (fields:
a dict of whatever the record holds; the worker picks ``--json-keys`` out of it) or an ``Issue``
for a record that cannot be read at all (invalid UTF-8, invalid JSON, not an object, a truncated
or corrupt compressed file). Nothing is held beyond the current line, block, file or row batch,
so memory does not grow with the input.

``progress.done`` is advanced to the bytes of the unit consumed so far, for the progress line.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import Issue
from .inputs import Unit, load_hf_dataset
from .partitions import Segment

_ROW_BATCH = 1024


@dataclass
class Record:
    """A readable record: ``number`` counts from 1 within the segment (line or row)."""

    number: int
    byte_offset: int | None
    fields: dict


class SegmentProgress:
    """Bytes of the current segment consumed, written by readers and read by the worker."""

    def __init__(self) -> None:
        self.done = 0


def _open_stream(unit: Unit):
    """``(raw_file, decompressed_stream)`` for a whole-file unit; the raw position tracks progress."""
    raw = open(unit.path, "rb")
    if unit.compression == "gz":
        return raw, gzip.GzipFile(fileobj=raw)
    if unit.compression == "zst":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return raw, io.BufferedReader(reader, buffer_size=1 << 20)
    return raw, raw


def _corrupt_stream_errors() -> tuple:
    import zstandard

    return (EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError, OSError)


def _lines(
    unit: Unit, segment: Segment, progress: SegmentProgress
) -> Iterator[tuple[int, int | None, bytes] | Issue]:
    """``(line_number, byte_offset, line)`` of the lines starting in the segment, or a final Issue."""
    if unit.compression is None:
        with open(unit.path, "rb") as f:
            position = segment.start
            if (
                segment.start > 0
            ):  # finish the line that straddles the cut; it belongs to the previous segment
                f.seek(segment.start - 1)
                position = segment.start - 1 + len(f.readline())
            number = 0
            while position < segment.end:
                line = f.readline()
                if not line:
                    break
                number += 1
                yield number, position, line
                position += len(line)
                progress.done = min(position, segment.end) - segment.start
        return
    raw, stream = _open_stream(unit)
    number = 0
    try:
        with raw, stream:
            for line in stream:
                number += 1
                yield number, None, line
                progress.done = raw.tell()
    except _corrupt_stream_errors() as error:
        yield Issue(
            "truncated_file",
            unit.path,
            number + 1,
            f"compressed stream ends or is corrupt: {error}",
            unit_kind=unit.kind,
        )
    progress.done = unit.size


def _jsonl_records(unit: Unit, segment: Segment, progress: SegmentProgress):
    for item in _lines(unit, segment, progress):
        if isinstance(item, Issue):
            yield item
            continue
        number, offset, line = item
        where = dict(segment_start=segment.start, byte_offset=offset)
        if not line.strip():
            yield Issue("empty", unit.path, number, "blank line", **where)
            continue
        try:  # parse the bytes: no decoded copy of a (possibly 100 MB) line outlives the parse
            fields = json.loads(line)
        except UnicodeDecodeError as error:
            yield Issue(
                "invalid_utf8",
                unit.path,
                number,
                f"invalid UTF-8: {error.reason} at byte {error.start}",
                **where,
            )
            continue
        except json.JSONDecodeError as error:
            yield Issue(
                "invalid_json",
                unit.path,
                number,
                f"invalid JSON: {error.msg} at column {error.colno}",
                **where,
            )
            continue
        if not isinstance(fields, dict):
            yield Issue(
                "not_an_object", unit.path, number, f"a JSON {type(fields).__name__}, not an object", **where
            )
            continue
        yield Record(number, offset, fields)


def _text_records(unit: Unit, key: str, blank_line_blocks: bool, progress: SegmentProgress):
    """One record per file, or per blank-line-separated block (numbered by its first line)."""
    block: list[bytes] = []
    first_line = 0
    for item in _lines(unit, Segment(0, 0, unit.size), progress):
        if isinstance(item, Issue):
            yield item
            break
        number, _, line = item
        if blank_line_blocks and not line.strip():
            if block:
                yield _decode_block(unit, first_line, block, key)
            block = []
            continue
        if not block:
            first_line = number
        block.append(line)
    if block:
        yield _decode_block(unit, first_line or 1, block, key)
    elif not blank_line_blocks:
        yield Issue("empty", unit.path, 1, "empty file", unit_kind="text")


def _decode_block(unit: Unit, first_line: int, lines: list[bytes], key: str):
    try:
        text = b"".join(lines).decode("utf-8")
    except UnicodeDecodeError as error:
        return Issue(
            "invalid_utf8", unit.path, first_line, f"invalid UTF-8: {error.reason}", unit_kind="text"
        )
    return Record(first_line, None, {key: text.rstrip("\n")})


def _table_records(table, keys: list[str]):
    present = [k for k in keys if k in table.column_names]
    number = 0
    for batch in table.select(present).to_batches(max_chunksize=_ROW_BATCH) if present else []:
        columns = [batch.column(i).to_pylist() for i in range(len(present))]
        for values in zip(*columns):
            number += 1
            yield Record(number, None, {k: v for k, v in zip(present, values) if v is not None})
    if not present:
        for number in range(1, table.num_rows + 1):
            yield Record(number, None, {})


def _parquet_records(unit: Unit, keys: list[str], progress: SegmentProgress):
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(unit.path)
    table = parquet.read_row_group(
        unit.row_group, columns=[k for k in keys if k in parquet.schema_arrow.names]
    )
    yield from _table_records(table, keys)
    progress.done = unit.size


_HF_CACHE: dict = {}


def _hf_records(unit: Unit, segment: Segment, keys: list[str], hf_split: str, progress: SegmentProgress):
    if unit.path not in _HF_CACHE:
        _HF_CACHE[unit.path] = load_hf_dataset(unit.path, hf_split).with_format("arrow")
    dataset = _HF_CACHE[unit.path]
    bytes_per_row = unit.size / max(1, unit.extent)
    for start in range(segment.start, segment.end, 16 * _ROW_BATCH):
        stop = min(segment.end, start + 16 * _ROW_BATCH)
        for record in _table_records(dataset[start:stop], keys):
            record.number += start - segment.start
            yield record
        progress.done = int((stop - segment.start) * bytes_per_row)


def read_segment(
    unit: Unit,
    segment: Segment,
    keys: list[str],
    text_documents: str,
    hf_split: str,
    progress: SegmentProgress,
) -> Iterator[Record | Issue]:
    """Records and issues of ``segment`` of ``unit`` (see the module docstring)."""
    if unit.kind == "jsonl":
        yield from _jsonl_records(unit, segment, progress)
    elif unit.kind == "text":
        yield from _text_records(unit, keys[0], text_documents == "blank-line", progress)
    elif unit.kind == "parquet":
        yield from _parquet_records(unit, keys, progress)
    else:
        yield from _hf_records(unit, segment, keys, hf_split, progress)
