"""ETags and Cache-Control for reads (section 10.1) and HEAD (section 5.5)."""

from __future__ import annotations

NO_STORE = "no-store"
SSE_CACHE_CONTROL = "no-cache"
CATCH_UP_CACHE_CONTROL = "public, max-age=60, stale-while-revalidate=300"
# An answer about an open tail: browsers must not keep it, shared caches for one second.
TAIL_CACHE_CONTROL = "public, max-age=0, s-maxage=1"
TAIL_SHARED_SECONDS = 1


def private(cache_control: str) -> str:
    """The same freshness, for the requester's cache only: what an authenticated read answers
    unless its grant is public (a shared cache must not hand it to someone else)."""
    if cache_control == NO_STORE:
        return cache_control
    if cache_control.startswith("public"):
        return "private" + cache_control[len("public") :]
    return "private, " + cache_control


def etag(stream_id: int, start: int, end: int, closed: bool, coding: str | None = None) -> str:
    """``"{stream}:{start}:{end}"``, with ``:c`` once the range is the end of a closed stream,
    and ``:{coding}`` when the body is compressed.

    The stream id changes when a path is deleted and re-created, and the closure mark makes
    the tag change on close, so a 304 never hides EOF. Each coding is a different
    representation (RFC 9110 8.8.3), so it has its own tag: a client's cached gzip body is
    confirmed by a 304 only when it would be sent gzip again.
    """
    suffix = ":c" if closed else ""
    if coding is not None:
        suffix += f":{coding}"
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
    """Catch-up and long-poll 200s are cacheable, but never past the stream's expiry.

    With a deadline, the stale-while-revalidate window fits in what is left after max-age:
    a cache may answer from a stale entry during that window, so it must end by the deadline
    too, or an expired stream's data would still be served.
    """
    if has_deadline and seconds_left is not None:
        left = int(seconds_left)
        max_age = max(0, min(60, left))
        if max_age == 0:
            return NO_STORE
        stale = min(300, left - max_age)
        if stale == 0:
            return f"public, max-age={max_age}"
        return f"public, max-age={max_age}, stale-while-revalidate={stale}"
    return CATCH_UP_CACHE_CONTROL


def tail_cache_control(has_deadline: bool, seconds_left: float | None) -> str:
    """For answers the next append makes out of date: an empty read at an open tail, and a
    long-poll that timed out.

    Not ``no-store``: a CDN that collapses identical requests (nginx's proxy_cache_lock) can
    only hand one upstream answer to the requests waiting on it through its cache. An answer
    it may not store releases the waiters one at a time, each going upstream in turn (half a
    second apart in nginx), so a crowd at the tail would queue. One second in shared caches
    lets them all leave together; browsers keep nothing. A late reader given the stored
    answer loses no data: its next read (a long-poll with the new cursor, a new cache key)
    reaches Relay. Caches count whole seconds, so the second may last nearly two: a stream
    with less than that left gets ``no-store``.
    """
    if has_deadline and (seconds_left is None or seconds_left < TAIL_SHARED_SECONDS + 1):
        return NO_STORE
    return TAIL_CACHE_CONTROL
