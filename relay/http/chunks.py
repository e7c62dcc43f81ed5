"""What a read returns: a chunk of committed bytes, from the hub's memory or the store, cut at
a message boundary in JSON mode. Catch-up reads (``reads.py``) and live reads (``live.py``)
both take their bytes here."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol import headers as h
from protocol import jsonmode
from protocol.errors import BadRequest
from protocol.model import StreamMeta
from protocol.retention import check_retained
from relay.http import compression
from relay.http.context import Context


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes read from ``start`` up to ``end``, and whether they reach the known tail."""

    data: bytes
    start: int
    end: int
    up_to_date: bool
    closed: bool  # the chunk ends at the final offset of a closed stream
    rendered: bytes | None = None  # the response body, when already rendered for others
    _encoded: dict[str, bytes] = field(default_factory=dict, init=False, compare=False, repr=False)

    def encoded(self, coding: str, body: bytes) -> bytes:
        """``body`` (this chunk rendered) compressed with ``coding``, once per chunk: readers
        woken by one commit share the chunk, so a thousand compress it once."""
        found = self._encoded.get(coding)
        if found is None:
            found = self._encoded[coding] = compression.encode(body, coding)
        return found


async def read_chunk(ctx: Context, meta: StreamMeta, start: int) -> Chunk:
    """Up to ``max_chunk_bytes`` from ``start``, cut at a message boundary in JSON mode."""
    limit = ctx.config.max_chunk_bytes
    end = min(meta.tail, start + limit)
    json_mode = h.is_json(meta.content_type)
    # The byte before proves start is a message boundary (the horizon is one by construction,
    # and its previous byte may be gone).
    first = start - 1 if json_mode and start > meta.retained_from else start
    data = ctx.hub.held(meta.stream_id, first, end)
    if data is None:
        data = await ctx.store.read(meta, first, end)
        if len(data) != end - first:  # rows gone: the horizon passed this reader meanwhile
            current = await ctx.store.head(meta.path, ctx.clock(), touch=False)
            check_retained(current, first)
            raise RuntimeError(f"stream {meta.stream_id}: short read at {first}")
    if first < start:
        check_boundary(data[:1])
        data = data[1:]
    if json_mode and end < meta.tail:
        data = await _whole_messages(ctx, meta, start, data, limit)
    return chunk_of(meta, start, data)


def check_boundary(previous: bytes) -> None:
    """A JSON read must start after a whole message: offsets inside one are not offsets
    Relay ever returned, and reading from them would hand out half a message."""
    if previous != jsonmode.SEPARATOR:
        raise BadRequest("invalid_offset", "offset is not on a message boundary")


async def _whole_messages(
    ctx: Context, meta: StreamMeta, start: int, data: bytes, limit: int
) -> bytes:
    """``data`` cut after its last whole message within ``limit``.

    A first message longer than ``limit`` goes whole: its end is found by reading on in
    windows of ``limit`` bytes, so the work is bounded by that message, not the stream.
    """
    cut = jsonmode.chunk_end(data, limit)
    if cut:
        return data[:cut]
    parts = [data]
    at = start + len(data)
    while at < meta.tail:
        window = await ctx.store.read(meta, at, min(meta.tail, at + limit))
        if not window:
            break
        cut = jsonmode.chunk_end(window, 0)  # the end of the message in progress
        if cut:
            parts.append(window[:cut])
            break
        parts.append(window)
        at += len(window)
    return b"".join(parts)


def chunk_of(meta: StreamMeta, start: int, data: bytes) -> Chunk:
    """``data`` read from ``start`` of a stream whose state is ``meta``."""
    end = start + len(data)
    at_tail = end >= meta.tail
    return Chunk(data, start, end, up_to_date=at_tail, closed=meta.closed and at_tail)


def render(meta: StreamMeta, data: bytes) -> bytes:
    """A read's body: stored bytes as they are, or a JSON stream's messages as one array."""
    return jsonmode.render(data) if h.is_json(meta.content_type) else data
