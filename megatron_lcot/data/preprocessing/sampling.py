"""Draw a text sample from preprocessing inputs (for tokenizer training).

The sample spreads over the inputs: each input unit (file, Parquet row group, dataset) gives
at most ``sample_bytes / units`` characters from its start, so a corpus of many files is not
represented by its first file alone. Unreadable records are skipped silently (the preprocessing
run reports them).
"""

from __future__ import annotations

from collections.abc import Iterator

from .inputs import describe_units, expand_inputs
from .partitions import Segment
from .readers import Record, SegmentProgress, read_segment


def sample_texts(
    inputs: list[str], key: str, sample_bytes: int, text_documents: str = "file", hf_split: str = "train"
) -> Iterator[str]:
    """Yield documents (strings under ``key``) up to about ``sample_bytes`` characters in all."""
    units = describe_units(expand_inputs(inputs), hf_split)
    quota = max(1, sample_bytes // max(1, len(units)))
    for unit in units:
        taken = 0
        for item in read_segment(
            unit, Segment(0, 0, unit.extent), [key], text_documents, hf_split, SegmentProgress()
        ):
            text = item.fields.get(key) if isinstance(item, Record) else None
            if isinstance(text, str) and text.strip():
                yield text[: quota - taken]
                taken += min(len(text), quota - taken)
                if taken >= quota:
                    break
