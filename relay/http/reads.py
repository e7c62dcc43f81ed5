"""GET: catch-up reads, long-poll and SSE (sections 5.6 to 5.8)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from aiohttp import web

from protocol import caching, cursor, jsonmode, sse
from protocol import headers as h
from protocol.errors import BadRequest, NotFound, ProtocolError
from protocol.lifecycle import deadline
from protocol.model import StreamMeta
from protocol.offsets import format_offset, parse_read_offset
from protocol.retention import check_retained
from relay.auth.authorizer import ACCESS, Access
from relay.auth.errors import Unauthorized
from relay.http.context import Context, context
from relay.http.paths import stream_path, stream_url_path
from relay.hub import Subscription

LIVE_MODES = ("long-poll", "sse")
# nginx's per-response switch for proxy_buffering (it hides the header from clients). Off for
# SSE: a buffering proxy reads events as fast as Relay writes them and spools them for a slow
# reader, up to a gigabyte on disk, so --write-timeout never sees that reader stall.
ACCEL_BUFFERING = "X-Accel-Buffering"


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes read from ``start`` up to ``end``, and whether they reach the known tail."""

    data: bytes
    start: int
    end: int
    up_to_date: bool
    closed: bool  # the chunk ends at the final offset of a closed stream
    rendered: bytes | None = None  # the response body, when already rendered for others


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
        chunk = await _read_chunk(ctx, meta, position)
        response = _chunk_response(request, ctx, meta, chunk, cursor_value=None)
    if access is not None and not access.public:
        response.headers["Cache-Control"] = caching.private(response.headers["Cache-Control"])
    if meta.successor is not None:
        response.headers.update(h.successor_headers(stream_url_path(meta.successor)))
    return response


async def _read_chunk(ctx: Context, meta: StreamMeta, start: int) -> Chunk:
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
        _check_boundary(data[:1])
        data = data[1:]
    if json_mode and end < meta.tail:
        data = await _whole_messages(ctx, meta, start, data, limit)
    return _chunk(meta, start, data)


def _check_boundary(previous: bytes) -> None:
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


def _chunk(meta: StreamMeta, start: int, data: bytes) -> Chunk:
    end = start + len(data)
    at_tail = end >= meta.tail
    return Chunk(data, start, end, up_to_date=at_tail, closed=meta.closed and at_tail)


def _render(meta: StreamMeta, data: bytes) -> bytes:
    return jsonmode.render(data) if h.is_json(meta.content_type) else data


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
    tag = caching.etag(meta.stream_id, chunk.start, chunk.end, chunk.closed)
    out = {
        "Content-Type": meta.content_type,
        h.STREAM_NEXT_OFFSET: format_offset(chunk.end),
        "ETag": tag,
    }
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
    body = chunk.rendered if chunk.rendered is not None else _render(meta, chunk.data)
    return web.Response(status=200, headers=out, body=body)


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
    return web.Response(status=200, headers=out, body=_render(meta, b""))


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
        chunk = await _read_chunk(ctx, meta, position)
        return _chunk_response(request, ctx, meta, chunk, _cursor(ctx, request))
    if meta.closed:
        return _tail_response(ctx, meta, status=204, cursor_value=None, now=is_now)
    ctx.limits.enter_reader()
    ctx.metrics.long_poll_readers.inc()
    try:
        with ctx.hub.subscribe(meta.stream_id) as sub:
            found = await _wait_for_data(
                ctx, sub, meta, position, ctx.config.long_poll_timeout, access
            )
    finally:
        ctx.limits.exit_reader()
        ctx.metrics.long_poll_readers.dec()
    if found is None or found.start == found.end:
        latest = replace(meta, tail=found.end if found else meta.tail)
        if found is not None and found.closed:
            latest = replace(latest, closed=True)
        return _tail_response(
            ctx, latest, status=204, cursor_value=_cursor(ctx, request), now=is_now
        )
    return _chunk_response(request, ctx, meta, found, _cursor(ctx, request), now=is_now)


async def _wait_for_data(
    ctx: Context,
    sub: Subscription,
    meta: StreamMeta,
    position: int,
    timeout: float,
    access: Access | None = None,
) -> Chunk | None:
    """Park until data past ``position`` commits; None on timeout.

    Subscribing happens before re-reading the stream's state, so a commit landing between
    the first read and the subscription is never missed. A reader holding a credential
    re-checks it at every wake and every few seconds (401 once revoked or expired).
    """
    if sub.known_tail() is None:  # a watch already following the stream needs no re-check
        current = await ctx.store.head(meta.path, ctx.clock(), touch=False)
        if current.stream_id != meta.stream_id:
            raise NotFound()
        sub.note_tail(current.tail, current.closed)
    if access is None:
        woke = await sub.wait_beyond(position, timeout)
    else:
        woke = await _wait_checking(ctx, sub, position, timeout, access)
    if not woke:
        return None
    if sub.deleted:  # answer what a fresh read gets: 404, or 410 while forks keep it
        current = await ctx.store.head(meta.path, ctx.clock(), touch=False)
        if current.stream_id != meta.stream_id:
            raise NotFound("stream was deleted")
    return await _take(ctx, sub, meta, position)


async def _wait_checking(
    ctx: Context, sub: Subscription, position: int, timeout: float, access: Access
) -> bool:
    """``sub.wait_beyond`` in slices of at most ``recheck_seconds``, re-checking the
    credential after each; raises Unauthorized once it is no longer valid."""
    auth = ctx.auth
    assert auth is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        woke = await sub.wait_beyond(position, min(remaining, auth.recheck_seconds))
        auth.recheck(access.principal)
        if woke:
            return True
        if ctx.stopping or remaining <= auth.recheck_seconds:
            return False


async def _take(ctx: Context, sub: Subscription, meta: StreamMeta, position: int) -> Chunk:
    """The data past ``position`` that woke a reader: from the hub's memory, else the store.

    Readers woken by one commit at the same position share one chunk, rendered once (the
    fan-out case: a thousand long-polls of one chat take the same bytes)."""
    tail = sub.known_tail()
    assert tail is not None
    closed = sub.closed
    key = (position, tail, closed)
    shared = sub.shared.get(key)
    if isinstance(shared, Chunk):
        return shared
    latest = replace(meta, tail=tail, closed=closed)
    data = sub.take(position, ctx.config.max_chunk_bytes, json_mode=h.is_json(meta.content_type))
    chunk = (
        await _read_chunk(ctx, latest, position) if data is None else _chunk(latest, position, data)
    )
    chunk = replace(chunk, rendered=_render(meta, chunk.data))
    sub.shared[key] = chunk
    return chunk


async def _sse(
    request: web.Request, ctx: Context, meta: StreamMeta, position: int, access: Access | None
) -> web.StreamResponse:
    """Stream events until the stream closes, is deleted, or the reconnect interval passes.

    Each data event goes out in one write together with its control event, so a reader never
    sees data without the offset that follows it. A reader holding a credential re-checks it
    before every event and every few seconds while idle; the stream ends once it is revoked
    or expired.
    """
    json_mode = h.is_json(meta.content_type)
    binary = not h.is_text_like(meta.content_type)
    if json_mode and meta.retained_from < position < meta.tail:  # before the 200 goes out
        _check_boundary(await ctx.store.read(meta, position - 1, position))
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
    ctx.limits.enter_reader()
    ctx.metrics.sse_readers.inc()
    try:
        ctx.decorate(request, response)
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + ctx.config.sse_reconnect_interval
        with ctx.hub.subscribe(meta.stream_id) as sub:
            try:
                current = await ctx.store.head(meta.path, ctx.clock(), touch=False)
            except ProtocolError:  # removed since the first look: the reader re-connects
                return response
            if current.stream_id != meta.stream_id:  # the path now names another stream
                return response
            sub.note_tail(current.tail, current.closed)
            announced = False  # a control event for the current position went out
            while not sub.deleted:
                if access is not None and not _still_allowed(ctx, access):
                    break
                tail = sub.known_tail() or position
                event = b""
                if position < tail:
                    chunk = await _take(ctx, sub, meta, position)
                    data = chunk.data
                    if not (json_mode or binary or chunk.up_to_date):
                        data = data[: sse.text_chunk_end(data)]
                    event = sse.data_event(data, json_mode=json_mode, binary=binary)
                    position = chunk.start + len(data)
                    announced = False
                    tail = sub.known_tail() or position
                closed = sub.closed and position >= tail
                if closed:
                    announced = False  # the final control event must say streamClosed
                if not announced and (event or position >= tail):
                    event += sse.control_event(
                        format_offset(position),
                        cursor=None if closed else _cursor(ctx, request),
                        up_to_date=position >= tail,
                        closed=closed,
                    )
                    announced = True
                if event:
                    await _send(request, response, event, ctx.config.write_timeout)
                if closed:
                    break
                remaining = ends_at - loop.time()
                if position < tail and remaining > 0:
                    continue  # catching up; a reader far behind still reconnects on time
                if remaining <= 0:
                    break
                if access is None:
                    if not await sub.wait_beyond(position, remaining):
                        break
                    continue
                assert ctx.auth is not None
                every = ctx.auth.recheck_seconds
                woke = await sub.wait_beyond(position, min(remaining, every))
                if not woke and (ctx.stopping or remaining <= every):
                    break
    except ConnectionResetError:
        pass  # the reader went away; it resumes from the last control event's offset
    finally:
        ctx.limits.exit_reader()
        ctx.metrics.sse_readers.dec()
    return response


def _still_allowed(ctx: Context, access: Access) -> bool:
    assert ctx.auth is not None
    try:
        ctx.auth.recheck(access.principal)
    except Unauthorized:
        return False
    return True


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
