"""Stream lifetime: create-time configuration, expiry and the fork TTL inheritance table."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import BadRequest, Gone, NotFound
from protocol.headers import civil_from_days
from protocol.model import StreamMeta


@dataclass(frozen=True, slots=True)
class Expiry:
    """At most one of a sliding TTL (seconds) or an absolute deadline (Unix seconds)."""

    ttl: int | None = None
    expires_at: float | None = None

    def __post_init__(self) -> None:
        if self.ttl is not None and self.expires_at is not None:
            raise BadRequest("ttl_and_expires_at", "send Stream-TTL or Stream-Expires-At, not both")


def is_expired(meta: StreamMeta, now: float) -> bool:
    """A stream expires at its absolute deadline or after ``ttl`` seconds without access."""
    if meta.expires_at is not None and now >= meta.expires_at:
        return True
    return meta.ttl is not None and now >= meta.last_access + meta.ttl


def check_visible(meta: StreamMeta, now: float) -> None:
    """Soft-deleted streams are gone (410); expired ones no longer exist (404)."""
    if meta.soft_deleted:
        raise Gone()
    if is_expired(meta, now):
        raise NotFound()


def deadline(meta: StreamMeta) -> float | None:
    """When the stream expires if nobody touches it again."""
    if meta.expires_at is not None:
        return meta.expires_at
    if meta.ttl is not None:
        return meta.last_access + meta.ttl
    return None


def fork_expiry(source: StreamMeta, requested: Expiry) -> Expiry:
    """Section 4.2's table: a fork's own request wins; with none it inherits the source's."""
    if requested.ttl is not None or requested.expires_at is not None:
        return requested
    return Expiry(ttl=source.ttl, expires_at=source.expires_at)


def format_rfc3339(timestamp: float) -> str:
    """Unix seconds as an RFC 3339 UTC timestamp with milliseconds.

    Calendar arithmetic, not ``datetime``: every instant ``parse_expires_at`` accepts (years
    0000-9999) formats, and rounding to the millisecond undoes float error without carrying a
    truncated ``.999`` into the next second.
    """
    millis = round(timestamp * 1000)
    seconds, milli = divmod(millis, 1000)
    days, second_of_day = divmod(seconds, 86_400)
    year, month, day = civil_from_days(days)
    hour, rest = divmod(second_of_day, 3600)
    minute, second = divmod(rest, 60)
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}.{milli:03d}Z"
