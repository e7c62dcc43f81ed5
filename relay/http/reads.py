"""GET: catch-up reads, long-poll and SSE (sections 5.6 to 5.8)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from aiohttp import web

from protocol import caching, cursor, sse
from protocol import headers as h
from protocol.errors import BadRequest
from protocol.lifecycle import deadline
from protocol.model import StreamMeta
from protocol.offsets import format_offset, parse_read_offset
from protocol.retention import check_retained
from relay.auth.authorizer import ACCESS, Access
from relay.http import chunks, compression, live
from relay.http.chunks import Chunk, check_boundary, read_chunk
from relay.http.context import Context, context
from relay.http.paths import stream_path, stream_url_path

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
    if live == "long-poll":
        response = await _long_poll(request, ctx, meta, position, access, is_now=start.is_now)
    elif start.is_now:
        response = _tail_response(ctx, meta, status=200, cursor_value=None, now=True)
    else:
        chunk = await read_chunk(ctx, meta, position)
        response = _chunk_response(request, ctx, meta, chunk, cursor_value=None)
    if access is not None and not access.public:
        response.headers["Cache-Control"] = caching.private(response.headers["Cache-Control"])
    if meta.successor is not None:
        response.headers.update(h.successor_headers(stream_url_path(meta.successor)))
    return response


def _cursor(ctx: Context, request: web.Request) -> str:
    return cursor.next_cursor(ctx.clock(), request.query.get("cursor"), ctx.rng.randint(1, 3600))


def _chunk_response(
    request: web.Request,
    ctx: Context,
    meta: StreamMeta,
    chunk: Chunk,
    cursor_value: str | None,
    *,
    now: bool = False,
) -> web.Response:
    coding = None
    out = {"Content-Type": meta.content_type, h.STREAM_NEXT_OFFSET: format_offset(chunk.end)}
    if _compressible(ctx, meta, chunk):
        out["Vary"] = "Accept-Encoding"
        coding = compression.negotiate(request.headers.get("Accept-Encoding"))
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
    if caching.matches(request.headers.get("If-None-Match"), tag):
        return web.Response(status=304, headers=out)
    body = chunk.rendered if chunk.rendered is not None else chunks.render(meta, chunk.data)
    if coding is not None:
        body = chunk.encoded(coding, body)
    return web.Response(status=200, headers=out, body=body)


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


def _tail_response(
    ctx: Context, meta: StreamMeta, *, status: int, cursor_value: str | None, now: bool
) -> web.Response:
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
        return web.Response(status=204, headers=out)
    out["Content-Type"] = meta.content_type
    return web.Response(status=200, headers=out, body=chunks.render(meta, b""))


async def _long_poll(
    request: web.Request,
    ctx: Context,
    meta: StreamMeta,
    position: int,
    access: Access | None,
    *,
    is_now: bool,
) -> web.Response:
    if position < meta.tail and not is_now:
        chunk = await read_chunk(ctx, meta, position)
        return _chunk_response(request, ctx, meta, chunk, _cursor(ctx, request))
    if meta.closed:
        return _tail_response(ctx, meta, status=204, cursor_value=None, now=is_now)
    found = await live.long_poll(ctx, meta, position, access)
    if found is None or found.start == found.end:
        latest = replace(meta, tail=found.end if found else meta.tail)
        if found is not None and found.closed:
            latest = replace(latest, closed=True)
        return _tail_response(
            ctx, latest, status=204, cursor_value=_cursor(ctx, request), now=is_now
        )
    return _chunk_response(request, ctx, meta, found, _cursor(ctx, request), now=is_now)


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
    with live.reader_slot(ctx, ctx.metrics.sse_readers):
        try:
            ctx.decorate(request, response)
            await response.prepare(request)
            deadline = asyncio.get_running_loop().time() + ctx.config.sse_reconnect_interval
            with ctx.hub.subscribe(meta.stream_id) as sub:
                reader = live.LiveRead(ctx, sub, meta, access)
                feed = live.SseFeed(reader, position, deadline, lambda: _cursor(ctx, request))
                while (event := await feed.next_event()) is not None:
                    await _send(request, response, event, ctx.config.write_timeout)
        except ConnectionResetError:
            pass  # the reader went away; it resumes from the last control event's offset
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
