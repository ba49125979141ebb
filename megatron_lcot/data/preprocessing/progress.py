"""The periodic progress line and the closing summary of a preprocessing run.

Progress is one line every ``--log-interval`` seconds (readable in a batch job's log, unlike a
redrawn bar): documents, tokens, bytes read of the total, MB/s over the run, ETA, partitions.
Rates exclude partitions skipped by ``--resume``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from .errors import SKIP_REASONS


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


class ProgressLine:
    """Accumulates ``(bytes, documents, tokens)`` deltas and prints a line every ``interval`` s."""

    def __init__(
        self,
        total_bytes: int,
        partitions: int,
        interval: float,
        log: Callable[[str], None],
        done_bytes: int = 0,
        done_partitions: int = 0,
    ) -> None:
        self.total_bytes, self.partitions, self.interval, self.log = total_bytes, partitions, interval, log
        self.bytes, self.documents, self.tokens = done_bytes, 0, 0
        self.skipped_bytes = done_bytes
        self.finished_partitions = done_partitions
        self.start = time.monotonic()
        self.last = self.start

    def add(self, delta: tuple[int, int, int]) -> None:
        self.bytes += delta[0]
        self.documents += delta[1]
        self.tokens += delta[2]

    def partition_done(self) -> None:
        self.finished_partitions += 1

    def maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.bytes - self.skipped_bytes) / elapsed
        remaining = max(self.total_bytes - self.bytes, 0)
        eta = _duration(remaining / rate) if rate > 0 else "?"
        percent = 100.0 * self.bytes / max(self.total_bytes, 1)
        self.log(
            f"[preprocess] {_count(self.documents)} docs | {_count(self.tokens)} tokens | "
            f"{self.bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB ({percent:.1f}%) | "
            f"{rate / 1e6:.2f} MB/s | {_count(self.tokens / elapsed)} tok/s | ETA {eta} | "
            f"partitions {self.finished_partitions}/{self.partitions}"
        )


def format_summary(
    documents: int,
    tokens: int,
    input_bytes: int,
    skipped: Counter,
    issues: list[str],
    elapsed: float,
    outputs: list[str],
    resumed: int,
) -> str:
    """The closing report: totals, skipped records by reason, the first issues, rates, outputs."""
    lines = [
        "[preprocess] done",
        f"  documents written : {documents:,}",
        f"  tokens written    : {tokens:,}",
        f"  input read        : {input_bytes / 1e6:,.1f} MB",
        f"  elapsed           : {_duration(elapsed)} ({elapsed:.1f} s)",
        f"  throughput        : {tokens / max(elapsed, 1e-9):,.0f} tokens/s, {input_bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s",
    ]
    if resumed:
        lines.append(
            f"  resumed           : {resumed} finished partition(s) reused (counted above, not timed)"
        )
    total_skipped = sum(skipped.values())
    lines.append(f"  skipped records   : {total_skipped:,}")
    for reason in SKIP_REASONS:
        if skipped.get(reason):
            lines.append(f"    {reason:<16}: {skipped[reason]:,}")
    if issues:
        lines.append(f"  first {len(issues)} skipped:")
        lines.extend(f"    {issue}" for issue in issues)
    lines.append("  output:")
    lines.extend(f"    {path}" for path in outputs)
    return "\n".join(lines)
