"""Cut the ordered input units into contiguous partitions of about equal size.

A partition is the unit of parallel work, of atomic output and of ``--resume``. Partitions are
contiguous ranges of the document stream, so concatenating their outputs in order gives the
same dataset whatever their number (tests check ``--partitions 1`` and ``3`` byte for byte).

Boundaries fall at ``k * total_bytes / P``; inside a splittable unit the cut is exact (a JSON
lines byte offset or a dataset row), otherwise it snaps to the nearer end of the unit. Cuts that
coincide merge, so fewer than ``P`` partitions come back when the input cannot be cut that finely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .inputs import Unit

# Default partition size: large enough that per-partition costs vanish, small enough that a
# crash loses little work and that 4+ partitions per worker balance the load.
DEFAULT_PARTITION_BYTES = 256 << 20


@dataclass(frozen=True)
class Segment:
    """``[start, end)`` of ``units[unit]`` in the unit's own coordinates (see ``Unit.extent``)."""

    unit: int
    start: int
    end: int


def default_partition_count(units: list[Unit], workers: int) -> int:
    """At least 4 per worker (load balance), at least one per 256 MiB (crash granularity)."""
    total = sum(u.size for u in units)
    return max(4 * workers, math.ceil(total / DEFAULT_PARTITION_BYTES))


def plan_partitions(units: list[Unit], count: int) -> list[list[Segment]]:
    """Split ``units`` into at most ``count`` non-empty partitions, each a list of segments."""
    total = sum(u.size for u in units)
    cuts = {(0, 0), (len(units), 0)}
    cumulative, index = 0, 0
    for k in range(1, count):
        boundary = total * k / count
        while index < len(units) and cumulative + units[index].size <= boundary:
            cumulative += units[index].size
            index += 1
        if index == len(units):
            break
        unit = units[index]
        fraction = (boundary - cumulative) / unit.size
        if unit.splittable:
            position = min(unit.extent, int(unit.extent * fraction))
        else:
            position = 0 if fraction < 0.5 else unit.extent
        cuts.add((index + 1, 0) if position >= unit.extent else (index, position))
    ordered = sorted(cuts)
    return [_segments_between(units, start, end) for start, end in zip(ordered, ordered[1:])]


def _segments_between(units: list[Unit], start: tuple[int, int], end: tuple[int, int]) -> list[Segment]:
    (first, first_pos), (last, last_pos) = start, end
    if first == last:
        return [Segment(first, first_pos, last_pos)]
    segments = [Segment(first, first_pos, units[first].extent)]
    segments += [Segment(i, 0, units[i].extent) for i in range(first + 1, last)]
    if last < len(units) and last_pos > 0:
        segments.append(Segment(last, 0, last_pos))
    return segments
