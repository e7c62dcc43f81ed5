"""What a stream is, as the protocol's rules see it: plain values, no storage concerns."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.headers import ProducerHeaders


@dataclass(frozen=True, slots=True)
class Segment:
    """A byte range of one stored stream that a reader of this stream sees.

    A plain stream is one segment. A fork is its source's segments cut at the fork point,
    followed by its own: reads stitch them without copying any data.
    """

    stream_id: int
    start: int
    end: int | None  # None: up to the owning stream's tail


@dataclass(frozen=True, slots=True)
class StreamMeta:
    """A stream's configuration and position, as committed."""

    stream_id: int
    path: str
    content_type: str
    tail: int
    closed: bool = False
    ttl: int | None = None
    expires_at: float | None = None
    last_access: float = 0.0
    created_at: float = 0.0
    stream_seq: str | None = None
    closed_by: ProducerHeaders | None = None
    forked_from: str | None = None
    fork_offset: int = 0  # where this stream's own data starts; 0 unless a fork
    segments: tuple[Segment, ...] = field(default=())
    soft_deleted: bool = False
    source_id: int | None = None  # the fork source's internal id
    successor: str | None = None  # the stream that supersedes this closed one (its path)
    retained_from: int = 0  # the retention horizon: reads before it are 410


RECENT_ACKS = 8
"""Appends per producer whose acknowledged offset a duplicate gets back (Kafka keeps five)."""


@dataclass(frozen=True, slots=True)
class ProducerState:
    """The last accepted (epoch, seq) of one producer on one stream, and the end offset each of
    its newest appends (this epoch, up to ``RECENT_ACKS``) was acknowledged with, oldest first:
    a retry answered as a duplicate gets its own append's offset back, not the current tail."""

    epoch: int
    last_seq: int
    acks: tuple[tuple[int, int], ...] = ()  # (seq, Stream-Next-Offset it was acknowledged with)

    def acked(self, seq: int) -> int | None:
        """The offset ``seq`` was acknowledged with, if it is among the newest appends."""
        for known, offset in self.acks:
            if known == seq:
                return offset
        return None

    def with_ack(self, seq: int, offset: int) -> ProducerState:
        acks = (*self.acks, (seq, offset))[-RECENT_ACKS:]
        return ProducerState(self.epoch, self.last_seq, acks)


def fork_segments(chain: list[tuple[int, int]]) -> tuple[Segment, ...]:
    """The segments a reader of ``chain[0]`` sees, oldest first.

    ``chain`` lists (stream_id, fork_offset) from the stream itself up its sources. Each
    stream contributes its own data from its fork offset up to where its child cut it; a
    fork point inside a source's inherited range skips that source entirely.
    """
    segments: list[Segment] = []
    limit: int | None = None
    for stream_id, fork_offset in chain:
        if limit is None or fork_offset < limit:
            segments.append(Segment(stream_id, fork_offset, limit))
        limit = fork_offset if limit is None else min(limit, fork_offset)
        if limit == 0:
            break
    segments.reverse()
    return tuple(segments)
