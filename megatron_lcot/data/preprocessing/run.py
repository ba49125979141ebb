"""Coordinate a preprocessing run: validate, plan partitions, run workers, merge, summarize.

The coordinator does no per-document work. Its cost is planning (a ``stat`` per input file,
Parquet footers), one small progress message per worker every 0.5 s, and the final merge, a
streaming copy of the partition outputs. It therefore stays far from saturated at any worker
count (``benchmarks/preprocess_throughput.py`` measures its CPU seconds per GB).

Files, for ``--output-prefix P`` and key ``text``:

* ``P_partitions/manifest.json``: the settings and the partition plan (checked by ``--resume``);
* ``P_partitions/part-NNNNN-of-MMMMM_text_document.{bin,idx}`` and ``.done.json``: one per
  partition, committed atomically by the worker that made it;
* ``P_text_document.{bin,idx}``: the merged result, committed atomically (index last); the
  partition directory is then removed unless ``--keep-partitions``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

from ..tokenizers import TokenizerError, build_tokenizer
from .errors import PreprocessError, StrictModeError
from .indexed_writer import merge_indexed, token_dtype
from .inputs import describe_units, expand_inputs
from .partitions import default_partition_count, plan_partitions
from .progress import ProgressLine, format_summary
from .worker import PartitionTask, WorkerConfig, init_worker, load_done, output_prefix, process_partition


@dataclass
class PreprocessConfig:
    """The settings of one run; mirrors the flags of ``tools/preprocess_data.py``."""

    inputs: list[str]
    output_prefix: str
    tokenizer_args: (
        dict  # build_tokenizer kwargs: tokenizer_type, tokenizer_model, vocab_file, merge_file, vocab_size
    )
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    partitions: int | None = None  # None: default_partition_count
    split_sentences: bool = False
    text_documents: str = "file"  # or "blank-line"
    hf_split: str = "train"
    strict: bool = False
    resume: bool = False
    keep_partitions: bool = False
    log_interval: float = 10.0
    batch_chars: int = 1 << 20
    long_document_chars: int = 1 << 20
    max_document_chars: int = 0
    max_reported: int = 10


@dataclass
class PreprocessResult:
    documents: int
    tokens: int
    input_bytes: int
    skipped: Counter
    issues: list[str]
    elapsed: float
    outputs: list[str]
    partitions: int
    resumed: int


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_output_dir(prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PreprocessError(
            f"--output-prefix {prefix!r}: cannot write in {directory!r} ({error.strerror}); "
            "choose a writable directory."
        ) from None


def _validate(config: PreprocessConfig):
    """Every check that can fail fast, before any work; returns the tokenizer."""
    if config.workers < 1:
        raise PreprocessError(f"--workers {config.workers}: must be at least 1.")
    if config.partitions is not None and config.partitions < 1:
        raise PreprocessError(f"--partitions {config.partitions}: must be at least 1.")
    if not config.json_keys or any(not k or "/" in k for k in config.json_keys):
        raise PreprocessError(f"--json-keys {config.json_keys}: give one or more non-empty key names.")
    try:
        tokenizer = build_tokenizer(**config.tokenizer_args)
        if config.append_eod:
            _ = tokenizer.eod  # raises now, before any work, when the tokenizer has no end-of-document
    except TokenizerError as error:
        raise PreprocessError(str(error)) from None
    _check_output_dir(config.output_prefix)
    return tokenizer


def _resolve_location(issue: dict) -> str:
    """``path:line N`` / ``path row N`` for a reported issue (counting newlines only when needed)."""
    kind, record, path = issue.get("unit_kind", "jsonl"), issue["record"], issue["path"]
    if kind in ("parquet", "hf_disk", "hf_load"):
        where = f"{path} row {issue['segment_start'] + record}"
    else:
        line = record
        if issue.get("segment_start") and issue.get("byte_offset") is not None:
            with open(path, "rb") as f:
                line = _count_newlines(f, issue["byte_offset"]) + 1
        where = f"{path}:{line}"
    key = f" [{issue['key']}]" if issue.get("key") else ""
    return f"{where}{key}: {issue['reason']}: {issue['detail']}"


def _count_newlines(f, limit: int) -> int:
    count, remaining = 0, limit
    while remaining > 0:
        chunk = f.read(min(remaining, 16 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        remaining -= len(chunk)
    return count


def _manifest(config: PreprocessConfig, tokenizer, units, plan) -> dict:
    return {
        "inputs": [
            [u.path, u.size, os.path.getmtime(u.path) if os.path.exists(u.path) else 0, u.row_group]
            for u in units
        ],
        "tokenizer": dict(tokenizer.unique_identifiers, vocab_size=tokenizer.vocab_size),
        "json_keys": config.json_keys,
        "append_eod": config.append_eod,
        "split_sentences": config.split_sentences,
        "text_documents": config.text_documents,
        "hf_split": config.hf_split,
        "long_document_chars": config.long_document_chars,
        "max_document_chars": config.max_document_chars,
        "plan": [[[s.unit, s.start, s.end] for s in part] for part in plan],
    }


def _prepare_partition_dir(partition_dir: str, manifest: dict, resume: bool) -> None:
    """Fresh directory, or on ``--resume`` keep it if its manifest matches this run's."""
    path = os.path.join(partition_dir, "manifest.json")
    if resume and os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        differing = sorted(k for k in set(manifest) | set(previous) if manifest.get(k) != previous.get(k))
        if differing:
            raise PreprocessError(
                f"--resume: the partitions in {partition_dir!r} were made with different settings "
                f"({', '.join(differing)} differ); rerun with the same flags and inputs, or without --resume."
            )
        return
    shutil.rmtree(partition_dir, ignore_errors=True)
    os.makedirs(partition_dir)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f)
    os.replace(path + ".tmp", path)


def preprocess(config: PreprocessConfig, log: Callable[[str], None] = _stderr) -> PreprocessResult:
    """Run the whole pipeline; raises ``PreprocessError`` for a bad configuration and
    ``StrictModeError`` for the first bad record under ``--strict``."""
    start = time.monotonic()
    tokenizer = _validate(config)
    units = describe_units(expand_inputs(config.inputs), config.hf_split)
    text_inputs = any(u.kind == "text" for u in units)
    if text_inputs and len(config.json_keys) > 1:
        raise PreprocessError("--json-keys: plain-text inputs have one text per document; give a single key.")
    count = config.partitions or default_partition_count(units, config.workers)
    plan = plan_partitions(units, count)
    level = "sentence" if config.split_sentences else "document"
    partition_dir = config.output_prefix + "_partitions"
    final_prefixes = [f"{config.output_prefix}_{key}_{level}" for key in config.json_keys]

    _prepare_partition_dir(partition_dir, _manifest(config, tokenizer, units, plan), config.resume)
    for prefix in final_prefixes:  # an old result must not pass for this run's if it is interrupted
        for suffix in (".idx", ".bin"):
            if os.path.exists(prefix + suffix):
                os.remove(prefix + suffix)

    tasks = [PartitionTask(i, len(plan), [(units[s.unit], s) for s in part]) for i, part in enumerate(plan)]
    finished = {t.index: load_done(partition_dir, t.name) for t in tasks}
    finished = {i: s for i, s in finished.items() if s is not None}
    todo = [t for t in tasks if t.index not in finished]
    if len(plan) < config.workers:
        log(
            f"[preprocess] note: only {len(plan)} partition(s) for {config.workers} workers; "
            "some workers will idle (raise --partitions, or split compressed inputs)."
        )
    log(
        f"[preprocess] {len(units)} input unit(s), {sum(u.size for u in units) / 1e6:,.1f} MB, "
        f"{len(plan)} partition(s), {len(finished)} already done, {config.workers} worker(s), "
        f"tokenizer {type(tokenizer).__name__} (vocab {tokenizer.vocab_size}, {token_dtype(tokenizer.vocab_size).__name__})"
    )

    worker_config = WorkerConfig(
        tokenizer_args=config.tokenizer_args,
        keys=tuple(config.json_keys),
        level=level,
        append_eod=config.append_eod,
        text_documents=config.text_documents,
        hf_split=config.hf_split,
        strict=config.strict,
        dtype=token_dtype(tokenizer.vocab_size),
        partition_dir=partition_dir,
        batch_chars=config.batch_chars,
        long_document_chars=config.long_document_chars,
        max_document_chars=config.max_document_chars,
        max_issues=config.max_reported,
    )
    total_bytes = sum(u.size for u in units)
    progress = ProgressLine(
        total_bytes,
        len(plan),
        config.log_interval,
        log,
        done_bytes=sum(s.bytes for s in finished.values()),
        done_partitions=len(finished),
    )
    results = dict(finished)
    if todo:
        results.update(_run_workers(todo, worker_config, config.workers, progress))
    progress.maybe_print(force=True)

    for key, prefix in zip(config.json_keys, final_prefixes):
        merge_indexed([output_prefix(partition_dir, t.name, key, level) for t in tasks], prefix)
    if not config.keep_partitions:
        shutil.rmtree(partition_dir, ignore_errors=True)

    ordered = [results[t.index] for t in tasks]
    issues = [issue for s in ordered for issue in s.issues][: config.max_reported]
    result = PreprocessResult(
        documents=sum(s.documents for s in ordered),
        tokens=sum(s.tokens for s in ordered),
        input_bytes=total_bytes,
        skipped=sum((s.skipped for s in ordered), Counter()),
        issues=[_resolve_location(i) for i in issues],
        elapsed=time.monotonic() - start,
        outputs=[p + ext for p in final_prefixes for ext in (".bin", ".idx")],
        partitions=len(plan),
        resumed=len(finished),
    )
    log(
        format_summary(
            result.documents,
            result.tokens,
            result.input_bytes,
            result.skipped,
            result.issues,
            result.elapsed,
            result.outputs,
            result.resumed,
        )
    )
    return result


def _run_workers(
    tasks: list[PartitionTask], worker_config: WorkerConfig, workers: int, progress: ProgressLine
) -> dict:
    """Run ``tasks`` on ``workers`` forked processes, printing progress meanwhile.

    A ``ProcessPoolExecutor`` (not ``multiprocessing.Pool``) so that a worker killed by the
    system (e.g. out of memory) fails the run with a message instead of hanging it forever.
    """
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    results = {}
    executor = ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=context, initializer=init_worker, initargs=(worker_config, queue)
    )
    try:
        pending = {executor.submit(process_partition, t): t.index for t in tasks}
        while pending:
            _drain(queue, progress, timeout=0.2)
            for future in [f for f in pending if f.done()]:
                index = pending.pop(future)
                try:
                    results[index] = future.result()
                except BrokenProcessPool:
                    raise PreprocessError(
                        "a worker process died (killed, e.g. out of memory); finished partitions are kept: "
                        "rerun with --resume (and fewer --workers if memory is short)."
                    ) from None
                progress.partition_done()
            progress.maybe_print()
        _drain(queue, progress, timeout=0.05)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    return results


def _drain(queue, progress: ProgressLine, timeout: float) -> None:
    import queue as queue_module

    try:
        progress.add(queue.get(timeout=timeout))
        while True:
            progress.add(queue.get_nowait())
    except queue_module.Empty:
        pass


def strict_failure_message(error: StrictModeError) -> str:
    """The one-line message for the first bad record under ``--strict``."""
    return f"error: --strict: {_resolve_location(asdict(error.issue))}; fix the record or rerun without --strict to skip it."
