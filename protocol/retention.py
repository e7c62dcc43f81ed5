"""The retention horizon: how far back a stream still holds its bytes (PROTOCOL.md allows
retention; reads before the earliest retained offset are ``410 Gone``).

An application (with the admin action) advances a stream's horizon to an offset the stream has
passed; it never moves back. Reads before it are refused, ``offset=-1`` starts at it, forks
before it are refused, and a fork inherits its source's horizon (its prefix is the source's).
Stores delete the rows before it that no descendant fork can still read.
"""

from __future__ import annotations

from protocol import jsonmode
from protocol.errors import BadRequest, Conflict, Gone
from protocol.headers import is_json
from protocol.model import StreamMeta


class BeforeRetention(Gone):
    """A read before the stream's horizon (410, naming where retained data starts)."""

    def __init__(self, retained_from: int) -> None:
        super().__init__("offset is before the stream's retained data")
        self.retained_from = retained_from


def plan_horizon(meta: StreamMeta, offset: int, previous_byte: bytes) -> int | None:
    """The new horizon for ``meta``, or None when it is already there (an idempotent repeat).

    ``previous_byte`` is the stream's byte just before ``offset`` (empty at 0): in JSON mode a
    horizon must fall on a message boundary, like every offset Relay hands out.
    """
    if offset > meta.tail:
        raise BadRequest("retention_beyond_tail", "Stream-Retain-From is past the tail")
    if offset < meta.retained_from:
        raise Conflict("retention_backwards", "the retention horizon never moves back")
    if offset == meta.retained_from:
        return None
    if is_json(meta.content_type) and offset > 0 and previous_byte != jsonmode.SEPARATOR:
        raise BadRequest("invalid_offset", "Stream-Retain-From is not on a message boundary")
    return offset


def check_retained(meta: StreamMeta, position: int) -> None:
    """Refuse a read (or a fork point) at ``position`` before the horizon."""
    if position < meta.retained_from:
        raise BeforeRetention(meta.retained_from)
