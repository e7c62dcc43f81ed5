"""What every batched store shares: the stream row's columns, named SQL and migrations,
staging appended rows, and stitching reads across fork segments.

Backends differ only in their driver (sqlite3 on a writer thread, asyncpg on the loop); the
shapes of rows and the order of columns live here once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from protocol.append import AppendPlan
from protocol.headers import ProducerHeaders
from protocol.model import StreamMeta

META_COLUMNS = (
    "id, path, content_type, tail, closed, ttl, expires_at, last_access, created_at, "
    "stream_seq, closed_by_id, closed_by_epoch, closed_by_seq, source_id, forked_from, "
    "fork_offset, soft_deleted, successor, retained_from"
)
"""The stream row as every query returns it; :func:`row_meta` reads it back."""


def numbered_sql(backend: str) -> list[tuple[int, str]]:
    """``sql/<backend>/NNN_name.sql`` as (NNN, text), in order: a backend's migrations."""
    folder = resources.files("relay.store") / "sql" / backend
    found = [
        (int(entry.name.split("_", 1)[0]), entry.read_text())
        for entry in folder.iterdir()
        if entry.name.endswith(".sql") and entry.name[:1].isdigit()
    ]
    return sorted(found)


def named_queries(backend: str) -> dict[str, str]:
    """``sql/<backend>/queries.sql`` as name -> statement: a backend's SQL, loaded once.

    ``-- name: <name>`` opens each statement; other comment lines are dropped. ``{name}``
    inside one stands for an earlier named part (so statements that share a clause write it
    once), and ``{meta_columns}`` for :data:`META_COLUMNS`.
    """
    text = (resources.files("relay.store") / "sql" / backend / "queries.sql").read_text()
    parts: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-- name:"):
            name = stripped.removeprefix("-- name:").strip()
            parts[name] = ""
        elif name and stripped and not stripped.startswith("--"):
            parts[name] += line + "\n"
    queries = {"meta_columns": META_COLUMNS}
    for key, sql in parts.items():
        queries[key] = _PART.sub(lambda found: queries[found[1]], sql.strip().removesuffix(";"))
    return queries


_PART = re.compile(r"\{(\w+)\}")


def encode_acks(acks: tuple[tuple[int, int], ...]) -> str:
    """A producer's recent acknowledgements as stored: ``seq:offset`` pairs, comma-separated."""
    return ",".join(f"{seq}:{offset}" for seq, offset in acks)


def decode_acks(text: str | None) -> tuple[tuple[int, int], ...]:
    if not text:
        return ()
    pairs = (entry.split(":", 1) for entry in text.split(","))
    return tuple((int(seq), int(offset)) for seq, offset in pairs)


def row_meta(row: Any) -> StreamMeta:
    """A stream row (columns in ``META_COLUMNS`` order) as the protocol sees it."""
    closed_by = ProducerHeaders(row[10], row[11], row[12]) if row[10] is not None else None
    return StreamMeta(
        stream_id=row[0],
        path=row[1],
        content_type=row[2],
        tail=row[3],
        closed=bool(row[4]),
        ttl=row[5],
        expires_at=row[6],
        last_access=row[7],
        created_at=row[8],
        stream_seq=row[9],
        closed_by=closed_by,
        forked_from=row[14],
        fork_offset=row[15],
        soft_deleted=bool(row[16]),
        source_id=row[13],
        successor=row[17],
        retained_from=row[18],
    )


def after_append(meta: StreamMeta, plan: AppendPlan, now: float) -> StreamMeta:
    """The stream once ``plan`` (a write) is committed."""
    closed_by = plan.producer if plan.close else None
    return replace(
        meta,
        tail=meta.tail + len(plan.data),
        closed=meta.closed or plan.close,
        last_access=max(meta.last_access, now),
        stream_seq=plan.stream_seq or meta.stream_seq,
        closed_by=closed_by or meta.closed_by,
        successor=plan.successor or meta.successor,
    )


@dataclass
class StagedRows:
    """Appends of one transaction, gathered so consecutive ones to a stream become one row."""

    pending: dict[int, tuple[int, bytearray]] = field(default_factory=dict)

    def stage(self, stream_id: int, start: int, data: bytes) -> bool:
        """Stage ``data`` at ``start``; False if it cannot extend the stream's staged row, so
        the caller must flush first and stage again."""
        if not data:
            return True
        staged = self.pending.get(stream_id)
        if staged is None:
            self.pending[stream_id] = (start, bytearray(data))
            return True
        if staged[0] + len(staged[1]) != start:
            return False
        staged[1].extend(data)
        return True

    def drain(self) -> list[tuple[int, int, int, bytes]]:
        """(stream_id, start, end, data) per staged row, emptying the stage."""
        rows = [
            (sid, start, start + len(data), bytes(data))
            for sid, (start, data) in self.pending.items()
        ]
        self.pending.clear()
        return rows


def segment_ranges(meta: StreamMeta, start: int, end: int) -> list[tuple[int, int, int]]:
    """(stored stream id, lo, hi) to read, in order, for ``[start, end)`` of ``meta``."""
    ranges = []
    for segment in meta.segments:
        hi = end if segment.end is None else min(end, segment.end)
        lo = max(start, segment.start)
        if lo < hi:
            ranges.append((segment.stream_id, lo, hi))
    return ranges


def stitch(out: bytearray, rows: Iterable[tuple[int, bytes]], lo: int, hi: int) -> None:
    """Append the part of each stored row ``(start_pos, data)`` inside ``[lo, hi)``."""
    for row_start, data in rows:
        out += data[max(0, lo - row_start) : hi - row_start]
