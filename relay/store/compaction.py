"""Row compaction that both stores share: which of a stream's rows merge, and what a pass did.

A stream's appends land as rows of one group commit each (a long stream of tokens kept one row
per 6 to 100 bytes). Once a stream is closed or idle, its compactor merges contiguous rows
into rows of up to ``COMPACT_BYTES``, so the rows a stream keeps follow its bytes, not its
appends. Each backend runs the merge in its own transactions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

COMPACT_BYTES = 1024 * 1024
COMPACT_PASS_BYTES = 16 * COMPACT_BYTES  # read per compaction pass, per relay
COMPACT_CANDIDATES = 100
COMPACT_IDLE_SECONDS = 10.0
"""How long a stream goes unwritten before its rows are merged."""
COMPACT_INTERVAL = 2.0


@dataclass(frozen=True, slots=True)
class CompactionPass:
    """What one compaction pass did: streams locked, rows merged away, bytes read."""

    streams: int = 0
    rows_removed: int = 0
    bytes_read: int = 0


def runs(rows: Sequence[Sequence[int]]) -> Iterator[list[Sequence[int]]]:
    """``(start_pos, end_pos)`` rows grouped greedily into contiguous runs of at most
    COMPACT_BYTES: after merging, no two adjacent rows fit in COMPACT_BYTES together."""
    run: list[Sequence[int]] = []
    size = 0
    for row in rows:
        length = row[1] - row[0]
        contiguous = run and run[-1][1] == row[0]
        if run and (not contiguous or size + length > COMPACT_BYTES):
            yield run
            run, size = [], 0
        run.append(row)
        size += length
    if run:
        yield run


def merges(
    bounds: Sequence[Sequence[int]], budget: int, spent: int
) -> tuple[list[tuple[int, int, int]], bool]:
    """The runs of ``bounds`` worth merging as ``(start, end, rows)``, within what is left of
    a pass's ``budget`` (``spent`` read already; at least one run when nothing is), and
    whether they are all of them (the stream is then compacted)."""
    chosen: list[tuple[int, int, int]] = []
    for run in runs(bounds):
        if len(run) < 2:
            continue
        start, end = run[0][0], run[-1][1]
        if spent and spent + end - start > budget:
            return chosen, False
        chosen.append((start, end, len(run)))
        spent += end - start
    return chosen, True
