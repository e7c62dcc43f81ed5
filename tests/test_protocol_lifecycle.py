"""Expiry, visibility, cursors (section 10.1) and cache headers: pure functions of their inputs,
with time passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from protocol import caching, cursor
from protocol.errors import BadRequest, Gone, NotFound, ProtocolError
from protocol.headers import parse_expires_at
from protocol.lifecycle import (
    Expiry,
    check_visible,
    deadline,
    format_rfc3339,
    is_expired,
)
from protocol.model import StreamMeta

T = 1_800_000_000.0
BASE = StreamMeta(1, "s", "text/plain", tail=0, last_access=T)


@pytest.mark.parametrize(
    ("meta", "now", "expired", "until"),
    [
        pytest.param(BASE, T + 1e9, False, None, id="no-expiry"),
        pytest.param(replace(BASE, ttl=10), T + 9.9, False, T + 10, id="ttl-not-yet"),
        pytest.param(replace(BASE, ttl=10), T + 10, True, T + 10, id="ttl-at-deadline"),
        pytest.param(
            replace(BASE, ttl=10, last_access=T + 5), T + 12, False, T + 15, id="access-slides-ttl"
        ),
        pytest.param(replace(BASE, expires_at=T + 3), T + 2, False, T + 3, id="absolute"),
        pytest.param(replace(BASE, expires_at=T + 3), T + 3, True, T + 3, id="absolute-past"),
    ],
)
def test_expiry(meta: StreamMeta, now: float, expired: bool, until: float | None) -> None:
    assert is_expired(meta, now) is expired
    assert deadline(meta) == until


@pytest.mark.parametrize(
    ("meta", "error"),
    [
        pytest.param(replace(BASE, soft_deleted=True), Gone, id="soft-deleted-410"),
        pytest.param(replace(BASE, ttl=1, last_access=T - 2), NotFound, id="expired-404"),
        pytest.param(
            replace(BASE, soft_deleted=True, ttl=1, last_access=T - 2), Gone, id="deleted-wins"
        ),
    ],
)
def test_invisible_streams(meta: StreamMeta, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        check_visible(meta, T)


def test_visible_streams_pass() -> None:
    check_visible(replace(BASE, ttl=10), T + 1)


def test_ttl_and_deadline_together_are_400() -> None:
    with pytest.raises(BadRequest):
        Expiry(ttl=1, expires_at=T)


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1893456000.25, "2030-01-01T00:00:00.250Z"),
        (-0.001, "1969-12-31T23:59:59.999Z"),
        (951782400.0, "2000-02-29T00:00:00.000Z"),
        (253402300799.999, "9999-12-31T23:59:59.999Z"),
        (-62167219200.0, "0000-01-01T00:00:00.000Z"),
    ],
)
def test_rfc3339(timestamp: float, text: str) -> None:
    assert format_rfc3339(timestamp) == text


@pytest.mark.parametrize(
    "text",
    [
        "0000-01-01T00:00:00.000Z",
        "0000-02-29T12:34:56.789Z",
        "1600-03-01T00:00:00.001Z",
        "2038-01-19T03:14:08.000Z",
        "9999-12-31T23:59:59.999Z",
    ],
)
def test_rfc3339_round_trips_through_the_header_parser(text: str) -> None:
    assert format_rfc3339(parse_expires_at(text)) == text


NOW_INTERVAL = cursor.interval(T)


@pytest.mark.parametrize(
    ("client", "jitter", "expected"),
    [
        pytest.param(None, 1, NOW_INTERVAL, id="no-cursor-current-interval"),
        pytest.param(str(NOW_INTERVAL - 5), 1, NOW_INTERVAL, id="old-cursor-current"),
        pytest.param(str(NOW_INTERVAL), 1, NOW_INTERVAL + 1, id="current-cursor-advances"),
        pytest.param(str(NOW_INTERVAL), 41, NOW_INTERVAL + 3, id="jitter-in-intervals"),
        pytest.param(str(NOW_INTERVAL + 9), 1, NOW_INTERVAL + 10, id="future-cursor-advances"),
        pytest.param("garbage", 1, NOW_INTERVAL, id="garbage-ignored"),
        pytest.param("9" * 30, 1, NOW_INTERVAL, id="huge-ignored"),
    ],
)
def test_cursor_never_goes_backwards(client: str | None, jitter: int, expected: int) -> None:
    assert cursor.next_cursor(T, client, jitter) == str(expected)


def test_cursor_intervals_are_20_seconds_from_the_spec_epoch() -> None:
    assert cursor.interval(cursor.EPOCH) == 0
    assert cursor.interval(cursor.EPOCH + 19.9) == 0
    assert cursor.interval(cursor.EPOCH + 20) == 1


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ('"1:0:5"', True),
        ('W/"1:0:5"', True),
        ('"x", "1:0:5"', True),
        ("*", True),
        ('"1:0:5:c"', False),
        ('"1:0:4"', False),
        ("", False),
        (None, False),
    ],
)
def test_if_none_match(header: str | None, matches: bool) -> None:
    assert caching.matches(header, caching.etag(1, 0, 5, closed=False)) is matches


def test_etags_change_with_closure_and_range() -> None:
    tags = {
        caching.etag(1, 0, 5, closed=False),
        caching.etag(1, 0, 5, closed=True),
        caching.etag(1, 0, 6, closed=False),
        caching.etag(2, 0, 5, closed=False),
    }
    assert len(tags) == 4


@pytest.mark.parametrize(
    ("has_deadline", "left", "header"),
    [
        (False, None, caching.CATCH_UP_CACHE_CONTROL),
        (True, 3600.0, "public, max-age=60, stale-while-revalidate=300"),
        (True, 100.0, "public, max-age=60, stale-while-revalidate=40"),
        # Fresh until the deadline and no stale window after it: a cache answering from a
        # stale entry would serve an expired stream's data.
        (True, 60.9, "public, max-age=60"),
        (True, 30.5, "public, max-age=30"),
        (True, 0.5, "no-store"),
    ],
)
def test_read_cache_control_never_outlives_the_stream(
    has_deadline: bool, left: float | None, header: str
) -> None:
    assert caching.read_cache_control(has_deadline, left) == header


@pytest.mark.parametrize(
    ("has_deadline", "left", "header"),
    [
        # An open tail: one second in shared caches (collapsed waiters leave together),
        # nothing in browsers.
        (False, None, "public, max-age=0, s-maxage=1"),
        (True, 3600.0, "public, max-age=0, s-maxage=1"),
        (True, 2.0, "public, max-age=0, s-maxage=1"),
        # A cache counts whole seconds, so a second's lifetime may last nearly two.
        (True, 1.9, "no-store"),
        (True, 0.0, "no-store"),
    ],
)
def test_tail_cache_control_is_one_shared_second_within_the_stream_life(
    has_deadline: bool, left: float | None, header: str
) -> None:
    assert caching.tail_cache_control(has_deadline, left) == header


@pytest.mark.parametrize(
    ("shared", "private"),
    [
        pytest.param(
            "public, max-age=60, stale-while-revalidate=300",
            "private, max-age=60, stale-while-revalidate=300",
            id="catch-up",
        ),
        pytest.param(
            "public, max-age=5, stale-while-revalidate=5",
            "private, max-age=5, stale-while-revalidate=5",
            id="near-expiry",
        ),
        pytest.param("no-store", "no-store", id="expiring-tail"),
        pytest.param(
            "public, max-age=0, s-maxage=1", "private, max-age=0, s-maxage=1", id="open-tail"
        ),
        pytest.param("no-cache", "private, no-cache", id="sse"),
    ],
)
def test_authenticated_reads_keep_their_freshness_for_the_requester_only(
    shared: str, private: str
) -> None:
    assert caching.private(shared) == private
