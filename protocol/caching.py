"""ETags and Cache-Control for reads (section 10.1) and HEAD (section 5.5)."""

from __future__ import annotations

NO_STORE = "no-store"
SSE_CACHE_CONTROL = "no-cache"
CATCH_UP_CACHE_CONTROL = "public, max-age=60, stale-while-revalidate=300"


def private(cache_control: str) -> str:
    """The same freshness, for the requester's cache only: what an authenticated read answers
    unless its grant is public (a shared cache must not hand it to someone else)."""
    if cache_control == NO_STORE:
        return cache_control
    if cache_control.startswith("public"):
        return "private" + cache_control[len("public") :]
    return "private, " + cache_control


def etag(stream_id: int, start: int, end: int, closed: bool) -> str:
    """``"{stream}:{start}:{end}"``, with ``:c`` once the range is the end of a closed stream.

    The stream id changes when a path is deleted and re-created, and the closure mark makes
    the tag change on close, so a 304 never hides EOF.
    """
    suffix = ":c" if closed else ""
    return f'"{stream_id}:{start}:{end}{suffix}"'


def matches(if_none_match: str | None, tag: str) -> bool:
    """RFC 9110 weak comparison of an If-None-Match list against our tag."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        value = candidate.strip()
        if value == "*":
            return True
        if value.startswith("W/"):
            value = value[2:]
        if value == tag:
            return True
    return False


def read_cache_control(has_deadline: bool, seconds_left: float | None) -> str:
    """Catch-up and long-poll 200s are cacheable, but never past the stream's expiry."""
    if has_deadline and seconds_left is not None:
        max_age = max(0, min(60, int(seconds_left)))
        if max_age == 0:
            return NO_STORE
        return f"public, max-age={max_age}, stale-while-revalidate={min(300, max_age)}"
    return CATCH_UP_CACHE_CONTROL
