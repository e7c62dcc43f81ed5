"""PUT (create, fork), POST (append, close), DELETE and HEAD: parse, call the store, render."""

from __future__ import annotations

from aiohttp import web

from protocol import headers as h
from protocol import jsonmode
from protocol.append import AppendRequest
from protocol.caching import NO_STORE
from protocol.create import CreateRequest, ForkRequest
from protocol.errors import BadRequest, ProtocolError
from protocol.lifecycle import Expiry, format_rfc3339
from protocol.model import StreamMeta
from protocol.offsets import format_offset, parse_offset
from relay.auth.authorizer import ACCESS
from relay.auth.grants import ADMIN, READ
from relay.http.context import Context, context, read_body
from relay.http.paths import source_path, stream_path, stream_url_path
from relay.store.base import Revocation


def meta_headers(meta: StreamMeta) -> dict[str, str]:
    """Headers describing a stream: type, tail, closure, and its TTL or expiry."""
    out = {"Content-Type": meta.content_type, h.STREAM_NEXT_OFFSET: format_offset(meta.tail)}
    if meta.closed:
        out[h.STREAM_CLOSED] = "true"
    if meta.ttl is not None:
        out[h.STREAM_TTL] = str(meta.ttl)
    if meta.expires_at is not None:
        out[h.STREAM_EXPIRES_AT] = format_rfc3339(meta.expires_at)
    if meta.successor is not None:
        out.update(h.successor_headers(stream_url_path(meta.successor)))
    if meta.retained_from:
        out[h.STREAM_RETAINED_FROM] = format_offset(meta.retained_from)
    return out


async def create(request: web.Request) -> web.Response:
    ctx = context(request)
    path = stream_path(request.raw_path, ctx.config.max_path_length)
    hdrs = request.headers
    if h.STREAM_RETAIN_FROM in hdrs:
        return await _retain(request, ctx, path, hdrs[h.STREAM_RETAIN_FROM])
    if h.STREAM_COMPACT in hdrs:
        return await _compact(request, ctx, path, hdrs[h.STREAM_COMPACT])
    ttl = hdrs.get(h.STREAM_TTL)
    expires = hdrs.get(h.STREAM_EXPIRES_AT)
    expiry = Expiry(
        ttl=h.parse_ttl(ttl) if ttl is not None else None,
        expires_at=h.parse_expires_at(expires) if expires is not None else None,
    )
    fork = _fork_request(request, ctx.config.max_path_length)
    with ctx.limits.admit_write() as admission:
        body = await read_body(request, ctx.config.max_body_bytes, admission)
        content_type = h.parse_content_type(hdrs.get("Content-Type")) or None
        create_request = CreateRequest(
            path=path,
            content_type=content_type.strip() if content_type else None,
            expiry=expiry,
            closed=h.is_true(hdrs.get(h.STREAM_CLOSED)),
            body=body,
            fork=fork,
        )
        result = await ctx.store.create(create_request, ctx.clock())
    out = meta_headers(result.meta)
    if result.created:
        out["Location"] = str(request.url.with_query(None))
        ctx.metrics.streams_created.inc()  # its body reached readers through the sink
    return web.Response(status=201 if result.created else 200, headers=out)


async def _retain(request: web.Request, ctx: Context, path: str, value: str) -> web.Response:
    """``PUT`` with ``Stream-Retain-From`` (the admin action, as every PUT): advance an existing
    stream's retention horizon. It never creates, and takes no body or other settings."""
    offset = parse_offset(value.strip())
    with ctx.limits.admit_write() as admission:
        if await read_body(request, ctx.config.max_body_bytes, admission):
            raise BadRequest("retention_with_body", "Stream-Retain-From takes no body")
        meta = await ctx.store.retain(path, offset, ctx.clock())
    out = meta_headers(meta)
    out["Cache-Control"] = NO_STORE
    return web.Response(status=200, headers=out)


async def _compact(request: web.Request, ctx: Context, path: str, value: str) -> web.Response:
    """``PUT`` with ``Stream-Compact: state`` (an admin action, as every PUT): fold a State
    Protocol stream's history into a snapshot of its live rows and retain from there. Never
    creates; takes no body. The answer says what was folded (``Stream-Compacted``)."""
    if value.strip() != "state":
        raise BadRequest("invalid_compact", "Stream-Compact takes the value state")
    with ctx.limits.admit_write() as admission:
        if await read_body(request, ctx.config.max_body_bytes, admission):
            raise BadRequest("compact_with_body", "Stream-Compact takes no body")
        result = await ctx.store.compact_state(path, ctx.clock())
    out = meta_headers(result.meta)
    out["Cache-Control"] = NO_STORE
    out[h.STREAM_COMPACTED] = (
        f"messages={result.messages}; rows={result.rows}; history-bytes={result.history_bytes}"
    )
    return web.Response(status=200, headers=out)


def _fork_request(request: web.Request, max_path: int) -> ForkRequest | None:
    hdrs = request.headers
    source = hdrs.get(h.STREAM_FORKED_FROM)
    offset = hdrs.get(h.STREAM_FORK_OFFSET)
    sub = hdrs.get(h.STREAM_FORK_SUB_OFFSET)
    if source is None:
        if offset is not None or sub is not None:
            raise BadRequest("fork_without_source", "fork headers need Stream-Forked-From")
        return None
    return ForkRequest(
        source_path=source_path(source, max_path),
        offset=parse_offset(offset.strip()) if offset is not None else None,
        sub_offset=h.parse_non_negative(h.STREAM_FORK_SUB_OFFSET, sub.strip()) if sub else 0,
    )


async def append(request: web.Request) -> web.Response:
    ctx = context(request)
    path = stream_path(request.raw_path, ctx.config.max_path_length)
    hdrs = request.headers
    producer = h.parse_producer(
        hdrs.get(h.PRODUCER_ID), hdrs.get(h.PRODUCER_EPOCH), hdrs.get(h.PRODUCER_SEQ)
    )
    successor = await _successor(request, ctx, path, hdrs.get(h.STREAM_SUCCESSOR))
    with ctx.limits.admit_write() as admission:
        body = await read_body(request, ctx.config.max_body_bytes, admission)
        content_type = h.parse_content_type(hdrs.get("Content-Type"))
        data, data_error = body, None
        if body and h.is_json(content_type or ""):
            try:
                data = jsonmode.encode_messages(body, allow_empty=False)
            except BadRequest as exc:
                data_error = exc
        append_request = AppendRequest(
            content_type=content_type,
            data=data,
            close=h.is_true(hdrs.get(h.STREAM_CLOSED)),
            stream_seq=h.parse_stream_seq(hdrs.get(h.STREAM_SEQ)),
            producer=producer,
            data_error=data_error,
            body_empty=not body,
            successor=successor,
        )
        # Once queued, the append commits even if the client goes away, and the committer
        # hands it to the commit sink (relay/sink.py), which wakes its readers.
        result = await ctx.store.append(path, append_request, ctx.clock())
    meta, plan = result.meta, result.plan
    # A duplicate gets the offset its original append was acknowledged with (while remembered).
    acked = plan.acked_offset if plan.acked_offset is not None else meta.tail
    out = {h.STREAM_NEXT_OFFSET: format_offset(acked)}
    if meta.closed:
        out[h.STREAM_CLOSED] = "true"
    status = 204
    if producer is not None and plan.producer_state is not None:
        out[h.PRODUCER_EPOCH] = str(plan.producer_state.epoch)
        out[h.PRODUCER_SEQ] = str(plan.producer_state.last_seq)
        status = 200 if plan.write and plan.data else 204
    return web.Response(status=status, headers=out)


async def _successor(
    request: web.Request, ctx: Context, path: str, header: str | None
) -> str | None:
    """A ``Stream-Successor`` value: a stream path (as ``Stream-Forked-From`` takes one) of a
    stream that exists now and is not this one. It is checked here, before the close; a
    successor deleted later leaves readers a Link to a 404, as any deleted stream would."""
    if header is None:
        return None
    successor = source_path(header, ctx.config.max_path_length)
    if successor == path:
        raise BadRequest("invalid_successor", "a stream cannot succeed itself")
    access = request.get(ACCESS) if ctx.auth is not None else None
    if access is not None:  # naming a stream reveals whether it exists: the writer must see it
        assert ctx.auth is not None
        ctx.auth.permit(access.principal, READ, successor)
    try:
        await ctx.store.head(successor, ctx.clock(), touch=False)
    except ProtocolError:
        raise BadRequest("invalid_successor", "Stream-Successor names no live stream") from None
    return successor


async def append_json(ctx: Context, path: str, message: bytes) -> None:
    """Append one JSON message as the relay itself (pull-wake events), waking readers."""
    data = jsonmode.encode_messages(message, allow_empty=False)
    request = AppendRequest(content_type="application/json", data=data)
    await ctx.store.append(path, request, ctx.clock())


async def delete(request: web.Request) -> web.Response:
    ctx = context(request)
    path = stream_path(request.raw_path, ctx.config.max_path_length)
    hdrs = request.headers
    header = hdrs.get(h.STREAM_REVOKE_FROM)
    with_forks = h.parse_revoke_forks(hdrs.get(h.STREAM_REVOKE_FORKS), header)
    revoke = Revocation(parse_offset(header.strip())) if header is not None else None
    if revoke is not None and with_forks:
        forks = frozenset(await ctx.store.inheriting(path, revoke.offset))
        revoke = Revocation(revoke.offset, forks)
        access = request.get(ACCESS) if ctx.auth is not None else None
        if access is not None:
            assert ctx.auth is not None
            for fork in forks:  # deleting a fork is that fork's admin action
                ctx.auth.permit(access.principal, ADMIN, fork)
    with ctx.limits.admit_write():
        # The store tells the hub about the removal itself, after the commit.
        await ctx.store.delete(path, ctx.clock(), revoke)
    ctx.metrics.streams_deleted.inc()
    return web.Response(status=204)


async def head(request: web.Request) -> web.Response:
    ctx = context(request)
    path = stream_path(request.raw_path, ctx.config.max_path_length)
    meta = await ctx.store.head(path, ctx.clock(), touch=False)
    out = meta_headers(meta)
    out["Cache-Control"] = NO_STORE
    return web.Response(status=200, headers=out)
