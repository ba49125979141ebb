"""Find the inputs named by ``--input`` and describe them as ordered units of work.

Formats (by suffix; ``.gz`` / ``.zst`` may follow any of the text ones):

* JSON lines: ``.jsonl``, ``.json``, ``.ndjson`` -- one record per line, text under ``--json-keys``.
* Plain text: ``.txt``, ``.text``, ``.md``, ``.rst`` -- one document per file
  (``--text-documents file``) or per blank-line-separated block (``--text-documents blank-line``).
* Parquet: ``.parquet`` -- one record per row, text in the ``--json-keys`` columns.
* Hugging Face datasets: a directory written by ``Dataset.save_to_disk`` (or a ``DatasetDict``,
  split chosen by ``--hf-split``), or ``hf:PATH`` for ``datasets.load_dataset(PATH)`` over
  local files.

Directories are searched recursively (sorted, files with other suffixes ignored); globs are
expanded and sorted. The order of units is the order of documents in the output.

A ``Unit`` is the smallest thing a partition boundary may not cut, unless ``splittable``:
uncompressed JSON lines split at any byte (a range owns the lines that start inside it),
Hugging Face datasets at any row; compressed files, text files and Parquet row groups are whole.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from .errors import PreprocessError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
COMPRESSION_SUFFIXES = (".gz", ".zst")


@dataclass(frozen=True)
class Unit:
    """One readable piece of input, in output order.

    ``size`` is in bytes on disk (what progress and balancing count); ``extent`` is the unit's
    own coordinate range: bytes for JSON lines, rows for Hugging Face datasets and Parquet row
    groups, 1 for whole files.
    """

    path: str
    kind: str  # "jsonl" | "text" | "parquet" | "hf_disk" | "hf_load"
    compression: str | None  # None | "gz" | "zst"
    size: int
    extent: int
    splittable: bool
    row_group: int = -1  # Parquet only
    first_row: int = 0  # Parquet: rows in the file before this row group (for reporting)


def _format_of(path: str) -> tuple[str | None, str | None]:
    """``(kind, compression)`` from the file name, or ``(None, None)`` if not an input format."""
    name = path.lower()
    compression = None
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            compression, name = suffix[1:], name[: -len(suffix)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    return None, None


def _is_hf_disk_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    )


def expand_inputs(patterns: list[str]) -> list[str]:
    """Expand globs and directories into an ordered list of input paths (``hf:`` names kept)."""
    paths: list[str] = []
    for pattern in patterns:
        if pattern.startswith("hf:"):
            paths.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not os.path.exists(matches[0]):
            raise PreprocessError(
                f"--input {pattern!r}: no such file, directory or glob match; check the path."
            )
        for match in matches:
            if os.path.isdir(match) and not _is_hf_disk_dir(match):
                found = [
                    os.path.join(root, name)
                    for root, dirs, names in os.walk(match)
                    for name in names
                    if _format_of(name)[0] is not None
                ]
                dirs_found = sorted(found)
                if not dirs_found:
                    raise PreprocessError(
                        f"--input {match!r}: the directory holds no input files ({_supported()})."
                    )
                paths.extend(dirs_found)
            else:
                paths.append(match)
    return paths


def _supported() -> str:
    return (
        f"supported: {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)} (optionally .gz/.zst), .parquet, "
        "a save_to_disk directory, or hf:PATH"
    )


def load_hf_dataset(path: str, split: str):
    """Open a Hugging Face dataset: ``hf:PATH`` via ``load_dataset``, else ``load_from_disk``."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if path.startswith("hf:"):
            return datasets.load_dataset(path[3:], split=split)
        loaded = datasets.load_from_disk(path)
    except Exception as error:  # datasets raises many types; all mean "cannot open this input"
        raise PreprocessError(f"--input {path!r}: cannot open as a Hugging Face dataset ({error}).") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise PreprocessError(f"--hf-split {split!r}: {path!r} has splits {sorted(loaded)}; pick one.")
        loaded = loaded[split]
    return loaded


def describe_units(paths: list[str], hf_split: str) -> list[Unit]:
    """Turn input paths into units (Parquet: one per row group); raises on unsupported inputs."""
    units: list[Unit] = []
    for path in paths:
        if path.startswith("hf:") or os.path.isdir(path):
            dataset = load_hf_dataset(path, hf_split)
            kind = "hf_load" if path.startswith("hf:") else "hf_disk"
            size = max(1, int(dataset.data.nbytes))
            units.append(Unit(path, kind, None, size, len(dataset), splittable=True))
            continue
        kind, compression = _format_of(path)
        if kind is None:
            raise PreprocessError(f"--input {path!r}: unknown format; {_supported()}.")
        if not os.access(path, os.R_OK):
            raise PreprocessError(f"--input {path!r}: not readable; check its permissions.")
        size = os.path.getsize(path)
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:
                metadata = pq.ParquetFile(path).metadata
            except Exception as error:  # pyarrow raises ArrowInvalid / OSError
                raise PreprocessError(f"--input {path!r}: not a readable Parquet file ({error}).") from None
            first_row = 0
            for group in range(metadata.num_row_groups):
                group_meta = metadata.row_group(group)
                group_size = max(1, group_meta.total_byte_size)
                units.append(Unit(path, kind, None, group_size, group_meta.num_rows, False, group, first_row))
                first_row += group_meta.num_rows
        elif kind == "jsonl" and compression is None:
            units.append(Unit(path, kind, None, size, size, splittable=True))
        else:
            units.append(Unit(path, kind, compression, size, 1, splittable=False))
    return units
