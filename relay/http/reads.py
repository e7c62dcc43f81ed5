"""GET: catch-up reads, long-poll and SSE (sections 5.6 to 5.8)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import structlog
from aiohttp import web

from protocol import caching, cursor, sse
from protocol import headers as h
from protocol.errors import BadRequest
from protocol.lifecycle import deadline
from protocol.model import StreamMeta
from protocol.offsets import format_offset, parse_read_offset
from protocol.retention import check_retained
from relay.auth.authorizer import ACCESS, Access
from relay.http import chunks, compression, live, parked
from relay.http.chunks import Chunk, check_boundary, read_chunk
from relay.http.context import REQUEST_ID, Context, context
from relay.http.paths import stream_path, stream_url_path
from relay.http.wire import Answer

log = structlog.get_logger("relay.http")

LIVE_MODES = ("long-poll", "sse")
# nginx's per-response switch for proxy_buffering (it hides the header from clients). Off for
# SSE: a buffering proxy reads events as fast as Relay writes them and spools them for a slow
# reader, up to a gigabyte on disk, so --write-timeout never sees that reader stall.
ACCEL_BUFFERING = "X-Accel-Buffering"


async def get(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    path = stream_path(request.raw_path, ctx.config.max_path_length)
    query = request.query
    for name in ("offset", "live", "cursor"):
        if len(query.getall(name, [])) > 1:
            raise BadRequest("invalid_query", f"{name} given more than once")
    live = query.get("live")
    if live is not None and live not in LIVE_MODES:
        raise BadRequest("invalid_live", "live must be long-poll or sse")
    raw_offset = query.get("offset")
    if live is not None and raw_offset is None:
        # Section 5.7/5.8 make the offset mandatory for live reads (the official suite checks).
        raise BadRequest("offset_required", "live reads need an offset, e.g. offset=-1")
    start = parse_read_offset(raw_offset)
    meta = None
    if live == "long-poll" and start.position is not None:  # a re-poll at the tail
        meta = ctx.store.tracked(path, start.position, ctx.clock())
    if meta is None:
        meta = await ctx.store.head(path, ctx.clock(), touch=True)
    position = meta.tail if start.position is None else start.position
    if position > meta.tail:
        raise BadRequest("offset_beyond_tail", "offset is past the end of the stream")
    if start.beginning:
        position = max(position, meta.retained_from)  # -1: where retained data starts
    else:
        check_retained(meta, position)
    access = request.get(ACCESS) if ctx.auth is not None else None
    if live == "sse":
        return await _sse(request, ctx, meta, position, access)
    asked = Asked.of(request)
    if live == "long-poll":
        answer = await _long_poll(request, ctx, meta, position, access, asked, is_now=start.is_now)
        return parked.DETACHED if answer is None else answer.response()
    if start.is_now:
        answer = _tail_answer(ctx, meta, status=200, cursor_value=None, now=True)
    else:
        chunk = await read_chunk(ctx, meta, position)
        answer = _chunk_answer(ctx, meta, chunk, asked, cursor_value=None)
    return finish(answer, meta, access).response()


def finish(answer: Answer, meta: StreamMeta, access: Access | None) -> Answer:
    """What every read answer adds last: a credential's answer is private to its reader, and
    a superseded stream names its successor."""
    out = answer.headers
    if access is not None and not access.public and "Cache-Control" in out:
        out["Cache-Control"] = caching.private(out["Cache-Control"])
    if meta.successor is not None:
        out.update(h.successor_headers(stream_url_path(meta.successor)))
    return answer


@dataclass(frozen=True, slots=True)
class Asked:
    """What of a read's request its answer depends on, beyond the stream and the offset: kept
    by a parked reader instead of the request."""

    cursor: str | None
    accept_encoding: str | None
    if_none_match: str | None

    @classmethod
    def of(cls, request: web.Request) -> Asked:
        headers = request.headers
        return cls(
            request.query.get("cursor"),
            headers.get("Accept-Encoding"),
            headers.get("If-None-Match"),
        )


def next_cursor(ctx: Context, asked: Asked) -> str:
    return cursor.next_cursor(ctx.clock(), asked.cursor, ctx.rng.randint(1, 3600))


def _chunk_answer(
    ctx: Context,
    meta: StreamMeta,
    chunk: Chunk,
    asked: Asked,
    cursor_value: str | None,
    *,
    now: bool = False,
) -> Answer:
    coding = None
    out = {"Content-Type": meta.content_type, h.STREAM_NEXT_OFFSET: format_offset(chunk.end)}
    if _compressible(ctx, meta, chunk):
        out["Vary"] = "Accept-Encoding"
        coding = compression.negotiate(asked.accept_encoding)
        if coding is not None:
            out["Content-Encoding"] = coding
    tag = out["ETag"] = caching.etag(meta.stream_id, chunk.start, chunk.end, chunk.closed, coding)
    if chunk.up_to_date:
        out[h.STREAM_UP_TO_DATE] = "true"
    if chunk.closed:
        out[h.STREAM_CLOSED] = "true"
    if cursor_value is not None and not chunk.closed:
        out[h.STREAM_CURSOR] = cursor_value
    out["Cache-Control"] = _cache_control(
        ctx, meta, open_tail=chunk.start == chunk.end and not chunk.closed, now=now
    )
    if caching.matches(asked.if_none_match, tag):
        return Answer(304, out)
    body = chunk.rendered if chunk.rendered is not None else chunks.render(meta, chunk.data)
    if coding is not None:
        body = chunk.encoded(coding, body)
    return Answer(200, out, body)


def _compressible(ctx: Context, meta: StreamMeta, chunk: Chunk) -> bool:
    """Whether an answer's body depends on Accept-Encoding: a textual stream's chunk of at
    least ``--compress-min-bytes``. Decided on the stored bytes, before any render, so a 304
    carries the same Vary and ETag as the 200 it confirms."""
    least = ctx.config.compress_min_bytes
    return 0 < least <= len(chunk.data) and compression.compressible(meta.content_type)


def _cache_control(ctx: Context, meta: StreamMeta, *, open_tail: bool, now: bool) -> str:
    """What a cache may do with a read's answer (protocol/caching.py has the reasons).

    An answer to ``offset=now`` is never stored: the key stays the same while the tail moves,
    so a stored answer would hand a later reader an old "now".
    """
    if now:
        return caching.NO_STORE
    expires = deadline(meta)
    left = None if expires is None else expires - ctx.clock()
    if open_tail:
        return caching.tail_cache_control(expires is not None, left)
    return caching.read_cache_control(expires is not None, left)


def _tail_answer(
    ctx: Context, meta: StreamMeta, *, status: int, cursor_value: str | None, now: bool
) -> Answer:
    """An answer carrying no data: ``offset=now``, or a long-poll that found nothing new."""
    out = {
        h.STREAM_NEXT_OFFSET: format_offset(meta.tail),
        h.STREAM_UP_TO_DATE: "true",
        "Cache-Control": _cache_control(ctx, meta, open_tail=not meta.closed, now=now),
    }
    if meta.closed:
        out[h.STREAM_CLOSED] = "true"
    elif cursor_value is not None:
        out[h.STREAM_CURSOR] = cursor_value
    if status == 204:
        return Answer(204, out)
    out["Content-Type"] = meta.content_type
    return Answer(200, out, chunks.render(meta, b""))


async def _long_poll(
    request: web.Request,
    ctx: Context,
    meta: StreamMeta,
    position: int,
    access: Access | None,
    asked: Asked,
    *,
    is_now: bool,
) -> Answer | None:
    """The answer, or None once the reader is parked off aiohttp's hands (``parked``)."""
    if position < meta.tail and not is_now:
        chunk = await read_chunk(ctx, meta, position)
        answer = _chunk_answer(ctx, meta, chunk, asked, next_cursor(ctx, asked))
        return finish(answer, meta, access)
    if meta.closed:
        answer = _tail_answer(ctx, meta, status=204, cursor_value=None, now=is_now)
        return finish(answer, meta, access)
    park = parked.Park(request, position, asked, is_now, long_poll_answer)
    found = await live.long_poll(ctx, meta, position, access, park)
    if found is live.PARKED:
        return None
    return long_poll_answer(ctx, meta, found, asked, is_now, access)


def long_poll_answer(
    ctx: Context,
    meta: StreamMeta,
    found: Chunk | None,
    asked: Asked,
    is_now: bool,
    access: Access | None,
) -> Answer:
    """A long-poll's answer once it stopped waiting: the chunk that woke it, or a 204 at the
    tail (its time ran out, or the stream closed with nothing new)."""
    if found is None or found.start == found.end:
        latest = replace(meta, tail=found.end if found else meta.tail)
        if found is not None and found.closed:
            latest = replace(latest, closed=True)
        cursor_value = next_cursor(ctx, asked)
        answer = _tail_answer(ctx, latest, status=204, cursor_value=cursor_value, now=is_now)
    else:
        answer = _chunk_answer(ctx, meta, found, asked, next_cursor(ctx, asked), now=is_now)
    return finish(answer, meta, access)


async def _sse(
    request: web.Request, ctx: Context, meta: StreamMeta, position: int, access: Access | None
) -> web.StreamResponse:
    """Send ``live.SseFeed``'s events until it ends (closed, deleted, revoked, or the reconnect
    interval passed).

    Never compressed: a compressor keeps its window per connection (91 KiB for gzip, 790 KiB
    for zstd, against a few KiB for the whole parked reader), and a commit woken readers now
    share as one render would be compressed once per reader, each with its own history.
    """
    binary = not h.is_text_like(meta.content_type)
    asked = Asked.of(request)
    if h.is_json(meta.content_type) and meta.retained_from < position < meta.tail:
        check_boundary(await ctx.store.read(meta, position - 1, position))  # before the 200
    response = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": caching.SSE_CACHE_CONTROL
            if access is None or access.public
            else caching.private(caching.SSE_CACHE_CONTROL),
            ACCEL_BUFFERING: "no",
            **({h.STREAM_SSE_DATA_ENCODING: sse.BASE64} if binary else {}),
            **h.successor_headers(meta.successor and stream_url_path(meta.successor)),
        },
    )
    taken = live.Hold(ctx, ctx.metrics.sse_readers, meta.stream_id)
    hold: live.Hold | None = taken  # None once parked: the parked reader releases it
    try:
        ctx.decorate(request, response)
        await response.prepare(request)
        deadline = asyncio.get_running_loop().time() + ctx.config.sse_reconnect_interval
        reader = live.LiveRead(ctx, taken.sub, meta, access)
        feed = live.SseFeed(reader, position, deadline, lambda: next_cursor(ctx, asked))
        sent = 0
        while (event := await feed.next_event()) is not None:
            await _send(request, response, event, ctx.config.write_timeout)
            sent += len(event)
            if feed.would_wait() and parked.park_sse(request, feed, taken, sent):
                hold = None  # the parked reader sends the rest, and releases it
                return parked.DETACHED
    except ConnectionResetError:
        pass  # the reader went away; it resumes from the last control event's offset
    except Exception:
        if not response.prepared:
            raise  # nothing sent yet: Front answers with the error
        # The 200 and events went out: an error answer now would land inside the event
        # stream. End it instead; the reader resumes from its last control event's offset.
        log.warning("SSE feed ended by an error", request_id=request.get(REQUEST_ID), exc_info=True)
    finally:
        if hold is not None:
            hold.release()
    return response


async def _send(
    request: web.Request, response: web.StreamResponse, event: bytes, timeout: float
) -> None:
    """Write one event, dropping a client that has stopped reading for ``timeout`` seconds.

    Without this, a reader that never reads holds its slot and its buffered events forever.
    """
    try:
        async with asyncio.timeout(timeout):
            await response.write(event)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # close() would wait to flush to the stalled client
        raise ConnectionResetError("SSE reader stopped reading") from None
