"""Errors and bad-record records of preprocessing.

``PreprocessError`` is a user mistake found before any work (flag, path, permission): the tools
print its message and exit 2, without a traceback. ``Issue`` is one skipped record, with where it
was found; ``StrictModeError`` turns the first ``Issue`` into a failure under ``--strict``.
"""

from __future__ import annotations

from dataclasses import dataclass

# Reasons a record is skipped, in the order the summary lists them.
SKIP_REASONS = (
    "invalid_json",
    "not_an_object",
    "missing_key",
    "non_string",
    "invalid_utf8",
    "empty",
    "too_long",
    "tokenizer_error",
    "truncated_file",
)


class PreprocessError(ValueError):
    """A configuration problem; the message names the flag or file and the fix."""


@dataclass
class Issue:
    """One skipped record.

    ``record`` counts from 1 within the segment that found it (a line for JSON lines and text,
    a row for Parquet and datasets); ``segment_start`` and ``byte_offset`` let the coordinator
    turn it into an absolute line number of the file (only the reported few are resolved).
    """

    reason: str
    path: str
    record: int
    detail: str
    key: str | None = None
    segment_start: int = 0
    byte_offset: int | None = None
    unit_kind: str = "jsonl"


class StrictModeError(RuntimeError):
    """Raised in a worker under ``--strict`` at the first bad record; carries the ``Issue``."""

    def __init__(self, issue: Issue) -> None:
        super().__init__(issue.detail)
        self.issue = issue

    def __reduce__(self):  # crosses the worker -> coordinator pipe
        return (StrictModeError, (self.issue,))
