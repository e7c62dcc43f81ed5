"""Create (PUT) semantics: what a create asks for, and whether an existing stream matches it."""

from __future__ import annotations

from dataclasses import dataclass

from protocol import jsonmode
from protocol.errors import BadRequest, Conflict
from protocol.headers import DEFAULT_CONTENT_TYPE, is_json, media_type
from protocol.lifecycle import Expiry, fork_expiry
from protocol.model import StreamMeta


@dataclass(frozen=True, slots=True)
class ForkRequest:
    """``Stream-Forked-From`` with its optional offset and sub-offset, as sent."""

    source_path: str
    offset: int | None
    sub_offset: int = 0
    source_id: int | None = None  # set once a sub-offset was resolved against this stream


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A PUT as the handler parsed it. ``content_type`` None means "default or inherit"."""

    path: str
    content_type: str | None
    expiry: Expiry
    closed: bool
    body: bytes
    fork: ForkRequest | None = None


def matches_existing(
    existing: StreamMeta,
    request: CreateRequest,
    content_type: str,
    expiry: Expiry,
    fork_offset: int,
) -> bool:
    """Section 5.1: a repeated PUT is 200 only when type, expiry, closure and fork agree.

    ``content_type``, ``expiry`` and ``fork_offset`` are the request's effective values (a
    fork's inherited ones and its resolved fork point), so repeating a PUT verbatim matches.
    """
    if media_type(existing.content_type) != media_type(content_type):
        return False
    if existing.ttl != expiry.ttl:
        return False
    if (existing.expires_at is None) != (expiry.expires_at is None):
        return False
    if (
        existing.expires_at is not None
        and expiry.expires_at is not None
        and abs(existing.expires_at - expiry.expires_at) > 0.001
    ):
        return False
    if existing.closed != request.closed:
        return False
    forked_from = request.fork.source_path if request.fork else None
    if existing.forked_from != forked_from:
        return False
    return request.fork is None or existing.fork_offset == fork_offset


@dataclass(frozen=True, slots=True)
class CreatePlan:
    """A new stream to insert: resolved type, expiry, fork point and initial data."""

    content_type: str
    expiry: Expiry
    closed: bool
    data: bytes
    source: StreamMeta | None
    fork_offset: int
    retained_from: int = 0  # a fork's prefix is its source's: so is its horizon


def needs_source_bytes(request: CreateRequest) -> bool:
    """A sub-offset on a fork needs the source's bytes after the anchor to resolve."""
    return request.fork is not None and request.fork.sub_offset > 0


def plan_create(
    existing: StreamMeta | None,
    source: StreamMeta | None,
    request: CreateRequest,
    after_anchor: bytes = b"",
) -> CreatePlan | StreamMeta:
    """Decide a PUT. Returns the existing stream for an idempotent repeat, else a plan.

    ``source`` is the fork source (already checked to exist, not expired), and
    ``after_anchor`` the source's bytes from the fork offset when a sub-offset is given.
    Raises Conflict for a mismatching repeat or a soft-deleted path or source, and
    BadRequest for a fork point beyond the source's tail or an invalid body.
    """
    fork = request.fork
    content_type = request.content_type
    expiry = request.expiry
    if fork is not None:
        assert source is not None
        if source.soft_deleted:
            raise Conflict("fork_source_deleted", "the fork source is deleted")
        if fork.source_id is not None and fork.source_id != source.stream_id:
            raise Conflict("fork_source_replaced", "the fork source was replaced; retry")
        if content_type is not None and media_type(content_type) != media_type(source.content_type):
            raise Conflict("content_type_mismatch", "a fork must keep its source's type")
        content_type = content_type or source.content_type
        expiry = fork_expiry(source, expiry)
    content_type = content_type or DEFAULT_CONTENT_TYPE
    if existing is not None and existing.soft_deleted:
        raise Conflict("stream_deleted", "this path belongs to a deleted stream")
    fork_offset = 0
    if fork is not None and source is not None:
        fork_offset = _fork_point(source, fork, after_anchor)
    if existing is not None:
        if matches_existing(existing, request, content_type, expiry, fork_offset):
            return existing
        raise Conflict("stream_exists", "a stream with another configuration exists here")
    data = request.body
    if is_json(content_type) and data:
        data = jsonmode.encode_messages(data, allow_empty=True)
    horizon = source.retained_from if fork is not None and source is not None else 0
    return CreatePlan(content_type, expiry, request.closed, data, source, fork_offset, horizon)


def _fork_point(source: StreamMeta, fork: ForkRequest, after_anchor: bytes) -> int:
    anchor = source.tail if fork.offset is None else fork.offset
    if anchor > source.tail:
        raise BadRequest("fork_offset_beyond_tail", "Stream-Fork-Offset is past the tail")
    if anchor < source.retained_from:
        raise Conflict("fork_before_retention", "the fork point is before the retained data")
    if fork.sub_offset == 0:
        return anchor
    if is_json(source.content_type):
        extra = jsonmode.message_prefix(after_anchor, fork.sub_offset)
    else:
        extra = fork.sub_offset if fork.sub_offset <= len(after_anchor) else None
    if extra is None:
        raise BadRequest("fork_sub_offset_overshoot", "Stream-Fork-Sub-Offset is past the data")
    return anchor + extra
