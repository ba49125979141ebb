"""Tokenize one partition end to end inside a worker process: read, tokenize, write, commit.

Each worker does its own reading, JSON decoding, tokenization and writing, so the coordinating
process only hands out partitions and sums progress messages: nothing per document crosses a
process boundary (Megatron-LM's tool sends every document and its ids through the main
process, which then becomes the bottleneck as workers are added).

Documents are tokenized in batches of about ``batch_chars`` characters with the tokenizer's
batch call. A batch that fails is retried one document at a time, so one undecodable document
costs itself only. Documents over ``long_document_chars`` go through ``split_long_text``.

Output per key: ``<partition_dir>/part-NNNNN-of-MMMMM_<key>_<level>.{bin,idx}``, committed
atomically, then ``part-NNNNN-of-MMMMM.done.json`` (the partition's statistics) last: a
partition is finished if and only if its ``.done.json`` exists.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..tokenizers import build_tokenizer
from .errors import Issue, StrictModeError
from .indexed_writer import IndexedWriter
from .inputs import Unit
from .partitions import Segment
from .readers import Record, SegmentProgress, read_segment
from .text_split import split_long_text, split_sentences

_PROGRESS_SECONDS = 0.5


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs; pickled once per worker (small)."""

    tokenizer_args: dict  # kwargs of build_tokenizer
    keys: tuple[str, ...]
    level: str  # "document" | "sentence"
    append_eod: bool
    text_documents: str
    hf_split: str
    strict: bool
    dtype: type
    partition_dir: str
    batch_chars: int = 1 << 20
    long_document_chars: int = 1 << 20
    max_document_chars: int = 0  # 0: no limit; longer documents are skipped as "too_long"
    max_issues: int = 10


@dataclass
class PartitionTask:
    index: int
    count: int
    segments: list[tuple[Unit, Segment]]

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"


@dataclass
class PartitionStats:
    """What a partition did; summed by the coordinator and stored in ``.done.json``."""

    index: int
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    issues: list = field(default_factory=list)  # first max_issues Issue dicts
    seconds: float = 0.0


def done_path(partition_dir: str, name: str) -> str:
    return os.path.join(partition_dir, name + ".done.json")


def output_prefix(partition_dir: str, name: str, key: str, level: str) -> str:
    return os.path.join(partition_dir, f"{name}_{key}_{level}")


# Per-process state set by ``init_worker`` (a Pool initializer), so the tokenizer is built once.
_state: dict = {}


def init_worker(config: WorkerConfig, progress_queue) -> None:
    """Pool initializer: one single-threaded tokenizer per process, and the progress queue."""
    _state["config"] = config
    _state["tokenizer"] = build_tokenizer(**config.tokenizer_args, num_threads=1)
    _state["queue"] = progress_queue


class _PartitionRun:
    """The loop over one partition's records; holds the current batch and the writers."""

    def __init__(self, task: PartitionTask, config: WorkerConfig, tokenizer, queue) -> None:
        self.task, self.config, self.tokenizer, self.queue = task, config, tokenizer, queue
        self.stats = PartitionStats(task.index)
        self.writers = {
            key: IndexedWriter(
                output_prefix(config.partition_dir, task.name, key, config.level), config.dtype
            )
            for key in config.keys
        }
        self.batch: dict[str, list[str]] = {key: [] for key in config.keys}
        self.batch_where: dict[str, list[tuple[Issue, Unit, Segment]]] = {
            key: [] for key in config.keys
        }  # for tokenizer errors
        self.batch_chars = 0
        self.reported = (0, 0, 0)  # bytes, documents, tokens already sent to the coordinator
        self.last_report = time.monotonic()

    def run(self) -> PartitionStats:
        start = time.monotonic()
        try:
            done_bytes = 0
            for unit, segment in self.task.segments:
                progress = SegmentProgress()
                for item in read_segment(
                    unit,
                    segment,
                    list(self.config.keys),
                    self.config.text_documents,
                    self.config.hf_split,
                    progress,
                ):
                    if isinstance(item, Issue):
                        self._skip(item, unit, segment)
                    else:
                        self._add_record(item, unit, segment)
                    self.stats.bytes = done_bytes + progress.done
                    self._maybe_report()
                done_bytes += (
                    unit.size
                    if not unit.splittable
                    else int((segment.end - segment.start) * unit.size / unit.extent)
                )
                self.stats.bytes = done_bytes
            self._flush()
            for writer in self.writers.values():
                writer.finalize()
        except BaseException:
            for writer in self.writers.values():
                writer.abort()
            raise
        self.stats.seconds = time.monotonic() - start
        self._report()
        return self.stats

    def _skip(self, issue: Issue, unit: Unit, segment: Segment) -> None:
        issue.unit_kind = unit.kind
        if unit.kind in ("parquet", "hf_disk", "hf_load"):
            issue.segment_start = unit.first_row + segment.start
        if self.config.strict:
            raise StrictModeError(issue)
        self.stats.skipped[issue.reason] += 1
        if len(self.stats.issues) < self.config.max_issues:
            self.stats.issues.append(issue.__dict__)

    def _add_record(self, record: Record, unit: Unit, segment: Segment) -> None:
        def where(reason: str, key: str, detail: str) -> Issue:
            return Issue(
                reason, unit.path, record.number, detail, key, segment.start, record.byte_offset, unit.kind
            )

        def issue(reason: str, key: str, detail: str) -> None:
            self._skip(where(reason, key, detail), unit, segment)

        for key in self.config.keys:
            value = record.fields.get(key)
            if value is None:
                issue("missing_key", key, f"no (or null) value under --json-keys {key!r}")
            elif not isinstance(value, str):
                issue("non_string", key, f"value under {key!r} is a {type(value).__name__}, not a string")
            elif not value.strip():
                issue("empty", key, f"empty text under {key!r}")
            elif self.config.max_document_chars and len(value) > self.config.max_document_chars:
                issue(
                    "too_long",
                    key,
                    f"{len(value)} characters > --max-document-chars {self.config.max_document_chars}",
                )
            elif len(value) > self.config.long_document_chars:
                self._flush()
                self._add_long_document(key, value, where("tokenizer_error", key, ""), unit, segment)
            else:
                self.batch[key].append(value)
                self.batch_where[key].append((where("tokenizer_error", key, ""), unit, segment))
                self.batch_chars += len(value)
        if self.batch_chars >= self.config.batch_chars:
            self._flush()

    def _sequences(self, text: str) -> list[str]:
        return split_sentences(text) if self.config.level == "sentence" else [text]

    def _flush(self) -> None:
        """Tokenize and write the pending batch of every key, in input order."""
        for key, texts in self.batch.items():
            if not texts:
                continue
            sequences_per_doc = [self._sequences(t) for t in texts]
            flat = [s for seqs in sequences_per_doc for s in seqs]
            try:
                ids = self.tokenizer.tokenize_batch(flat)
            except Exception:
                ids = None
            documents = []
            cursor = 0
            for seqs, where in zip(sequences_per_doc, self.batch_where[key]):
                doc = (
                    ids[cursor : cursor + len(seqs)] if ids is not None else self._tokenize_one(seqs, *where)
                )
                cursor += len(seqs)
                if doc is not None:
                    documents.append(self._finish_document(doc))
            self.writers[key].add_documents([d for d in documents if d is not None])
            self.stats.documents += sum(d is not None for d in documents)
            texts.clear()
            self.batch_where[key].clear()
        self.batch_chars = 0

    def _tokenize_one(
        self, sequences: list[str], where: Issue, unit: Unit, segment: Segment
    ) -> list[list[int]] | None:
        try:
            return [self.tokenizer.tokenize(s) for s in sequences]
        except Exception as error:  # the batch failed: find and skip the offending document only
            where.detail = f"tokenizer failed: {type(error).__name__}: {error}"[:300]
            self._skip(where, unit, segment)
            return None

    def _finish_document(self, sequences: list[list[int]]) -> list[list[int]] | None:
        sequences = [s for s in sequences if len(s)]
        if not sequences:
            self.stats.skipped["empty"] += 1
            return None
        if self.config.append_eod:
            sequences[-1] = list(sequences[-1]) + [self.tokenizer.eod]
        self.stats.tokens += sum(len(s) for s in sequences)
        return sequences

    def _add_long_document(self, key: str, text: str, where: Issue, unit: Unit, segment: Segment) -> None:
        """Tokenize piecewise into small arrays, so memory is a few times the text, not ~40-130x."""
        sequences = []
        try:
            for sequence in self._sequences(text):
                pieces = [
                    np.asarray(self.tokenizer.tokenize(p), dtype=self.config.dtype)
                    for p in split_long_text(sequence, self.config.long_document_chars)
                ]
                if sum(len(p) for p in pieces):
                    sequences.append(pieces)
        except Exception as error:
            where.detail = f"tokenizer failed: {type(error).__name__}: {error}"[:300]
            self._skip(where, unit, segment)
            return
        if not sequences:
            self.stats.skipped["empty"] += 1
            return
        if self.config.append_eod:
            sequences[-1].append(np.asarray([self.tokenizer.eod], dtype=self.config.dtype))
        self.writers[key].add_array_document(sequences)
        self.stats.documents += 1
        self.stats.tokens += sum(len(p) for pieces in sequences for p in pieces)

    def _maybe_report(self) -> None:
        if time.monotonic() - self.last_report >= _PROGRESS_SECONDS:
            self._report()

    def _report(self) -> None:
        now = (self.stats.bytes, self.stats.documents, self.stats.tokens)
        if self.queue is not None:
            self.queue.put(tuple(a - b for a, b in zip(now, self.reported)))
        self.reported = now
        self.last_report = time.monotonic()


def process_partition(task: PartitionTask) -> PartitionStats:
    """Tokenize ``task`` into its partition files and commit them; returns its statistics."""
    config = _state["config"]
    stats = _PartitionRun(task, config, _state["tokenizer"], _state.get("queue")).run()
    record = {
        "index": stats.index,
        "documents": stats.documents,
        "tokens": stats.tokens,
        "bytes": stats.bytes,
        "skipped": dict(stats.skipped),
        "issues": stats.issues,
        "seconds": stats.seconds,
    }
    path = done_path(config.partition_dir, task.name)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return stats


def load_done(partition_dir: str, name: str) -> PartitionStats | None:
    """Statistics of a finished partition, or None if it is not finished."""
    try:
        with open(done_path(partition_dir, name)) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return PartitionStats(
        record["index"],
        record["documents"],
        record["tokens"],
        record["bytes"],
        Counter(record["skipped"]),
        record["issues"],
        record["seconds"],
    )
