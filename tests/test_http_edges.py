"""Edges of the grammar the spec and HTTP/1.1 state: extreme Stream-Expires-At values, the
reserved ``__ds/`` prefix, absolute-form request targets and the Host header.

Requests go over a raw socket (tests/raw_http.py) so nothing normalizes them on the way.
"""

from __future__ import annotations

import pytest
from pytest_aiohttp import AiohttpServer

from relay.app import make_app
from relay.config import Config
from relay.store.base import Store
from relay.store.postgres import PostgresStore
from relay.store.sqlite import SqliteStore
from tests.raw_http import raw_request
from tests.stores import Backend, backend

__all__ = ["backend"]  # the fixture, imported so pytest finds it here

TEXT = {"Content-Type": "text/plain"}


@pytest.fixture
async def port(backend: Backend, aiohttp_server: AiohttpServer) -> int:
    """A relay on each backend, with one text stream at ``/v1/stream/text``."""
    config = Config(data_dir=str(backend.data_dir), long_poll_timeout=0.2)
    store: Store = (
        SqliteStore(backend.data_dir) if backend.url is None else PostgresStore(backend.url)
    )
    server = await aiohttp_server(make_app(config, store))  # the app opens and closes the store
    assert server.port is not None
    assert (await raw_request(server.port, "PUT", "/v1/stream/text", TEXT)).status == 201
    return server.port


# (id, Stream-Expires-At, the value echoed back, or None when the answer must be 400)
EXPIRES_AT = [
    ("far-future-nanos", "9999-12-31T23:59:59.999999999Z", "9999-12-31T23:59:59.999Z"),
    ("far-future", "9999-12-31T23:59:59Z", "9999-12-31T23:59:59.000Z"),
    ("far-future-offset", "9999-12-31T23:59:59+23:59", "9999-12-31T00:00:59.000Z"),
    ("past-year-10000-in-utc", "9999-12-31T23:59:59-00:01", None),
    ("leap-second", "2030-06-30T23:59:60Z", "2030-07-01T00:00:00.000Z"),
    ("leap-second-at-end-of-range", "9999-12-31T23:59:60Z", None),
    ("offset-max", "2030-01-01T23:59:00+23:59", "2030-01-01T00:00:00.000Z"),
    ("offset-24h", "2030-01-01T00:00:00+24:00", None),
    ("offset-60-minutes", "2030-01-01T00:00:00+00:60", None),
    ("second-61", "2030-01-01T00:00:61Z", None),
    ("hour-24", "2030-01-01T24:00:00Z", None),
    ("feb-29-leap-year", "2400-02-29T00:00:00Z", "2400-02-29T00:00:00.000Z"),
    ("feb-29-common-year", "2100-02-29T00:00:00Z", None),
    ("month-00", "2030-00-01T00:00:00Z", None),
    ("day-00", "2030-01-00T00:00:00Z", None),
]


@pytest.mark.parametrize(
    ("value", "echoed"), [pytest.param(*row[1:], id=row[0]) for row in EXPIRES_AT]
)
async def test_extreme_expires_at_is_accepted_or_refused_never_a_500(
    port: int, value: str, echoed: str | None
) -> None:
    headers = {**TEXT, "Stream-Expires-At": value}
    created = await raw_request(port, "PUT", "/v1/stream/e", headers)
    if echoed is None:
        assert created.status == 400, created.body
        assert created.error_code() == "invalid_expires_at"
        return
    assert created.status == 201, created.body
    assert created.headers["stream-expires-at"] == echoed
    head = await raw_request(port, "HEAD", "/v1/stream/e")
    assert head.status == 200
    assert head.headers["stream-expires-at"] == echoed
    appended = await raw_request(port, "POST", "/v1/stream/e", TEXT, b"hi")
    assert appended.status == 204
    read = await raw_request(port, "GET", "/v1/stream/e?offset=-1")
    assert read.status == 200 and read.body == b"hi"
    assert "max-age=60" in read.headers["cache-control"]
    again = await raw_request(port, "PUT", "/v1/stream/e", headers)
    assert again.status == 200, again.body


@pytest.mark.parametrize(
    "value", ["0000-01-01T00:00:00Z", "0001-01-01T00:00:00+23:59", "1969-12-31T23:59:59Z"]
)
async def test_expires_at_in_the_distant_past_never_a_500(port: int, value: str) -> None:
    """A deadline already passed: the stream never becomes readable, but nothing breaks."""
    created = await raw_request(port, "PUT", "/v1/stream/p", {**TEXT, "Stream-Expires-At": value})
    assert created.status in (201, 400), created.body
    head = await raw_request(port, "HEAD", "/v1/stream/p")
    assert head.status == 404


async def test_the_longest_ttl_the_grammar_allows_works(port: int) -> None:
    headers = {**TEXT, "Stream-TTL": "9" * 12}
    assert (await raw_request(port, "PUT", "/v1/stream/t", headers)).status == 201
    assert (await raw_request(port, "POST", "/v1/stream/t", TEXT, b"x")).status == 204
    read = await raw_request(port, "GET", "/v1/stream/t?offset=-1")
    assert read.status == 200 and read.body == b"x"
    head = await raw_request(port, "HEAD", "/v1/stream/t")
    assert head.headers["stream-ttl"] == "9" * 12


RESERVED = [
    "/v1/stream/__ds",
    "/v1/stream/__ds/",
    "/v1/stream/__ds/subscriptions/sub-1",
    "/v1/stream/%5F%5Fds/subscriptions/sub-1",
]


@pytest.mark.parametrize("target", RESERVED)
@pytest.mark.parametrize("method", ["PUT", "POST", "GET", "HEAD", "DELETE", "OPTIONS", "PATCH"])
async def test_the_reserved_ds_prefix_is_never_a_stream(
    port: int, method: str, target: str
) -> None:
    """Section 6: ``__ds`` as the first segment is for subscription control APIs, routed
    before stream operations: no stream there exists or can be made (an empty PUT is not a
    valid subscription either)."""
    response = await raw_request(port, method, target, TEXT, b"x" if method == "POST" else b"")
    # Deleting an absent subscription is idempotent (204); OPTIONS is a CORS preflight.
    allowed = (204, 404) if method in ("OPTIONS", "DELETE") else (400, 404, 405)
    assert response.status in allowed, response.body
    assert (await raw_request(port, "GET", target + "?offset=-1")).status == 404


async def test_ds_elsewhere_in_a_path_is_an_ordinary_stream(port: int) -> None:
    assert (await raw_request(port, "PUT", "/v1/stream/a/__ds", TEXT)).status == 201
    assert (await raw_request(port, "PUT", "/v1/stream/__dsx", TEXT)).status == 201


async def test_a_fork_cannot_name_a_reserved_source(port: int) -> None:
    headers = {**TEXT, "Stream-Forked-From": "/v1/stream/__ds/subscriptions/sub-1"}
    response = await raw_request(port, "PUT", "/v1/stream/fork", headers)
    assert response.status == 404
    assert (await raw_request(port, "HEAD", "/v1/stream/fork")).status == 404


async def test_absolute_form_targets_are_served_like_origin_form(port: int) -> None:
    """RFC 9112 3.2.2: a server MUST accept the absolute form; the path part names the stream."""
    base = "http://test/v1/stream"
    created = await raw_request(port, "PUT", f"{base}/abs", TEXT)
    assert created.status == 201, created.body
    appended = await raw_request(port, "POST", f"HTTP://Test:80{base[11:]}/abs", TEXT, b"hi")
    assert appended.status == 204, appended.body
    read = await raw_request(port, "GET", f"{base}/abs?offset=-1")
    assert read.status == 200 and read.body == b"hi"
    assert (await raw_request(port, "GET", "/v1/stream/abs?offset=-1")).body == b"hi"
    assert (await raw_request(port, "HEAD", f"{base}/abs")).status == 200
    assert (await raw_request(port, "GET", f"{base}/a/../abs?offset=-1")).status == 400
    assert (await raw_request(port, "DELETE", f"{base}/abs")).status == 204


async def test_absolute_form_uses_the_targets_authority_not_the_host_header(port: int) -> None:
    """RFC 9112 3.2.2: with an absolute target the Host field is ignored."""
    response = await raw_request(
        port, "PUT", "http://relay.example:8080/v1/stream/loc", TEXT, host="elsewhere"
    )
    assert response.status == 201
    assert response.headers["location"] == "http://relay.example:8080/v1/stream/loc"


@pytest.mark.parametrize(
    "host",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),  # an http URI's host is never empty (RFC 9110 4.2.1)
        pytest.param(("a", "b"), id="twice"),
        pytest.param("a b", id="space"),
        pytest.param("a/b", id="slash"),
        pytest.param("a@b", id="userinfo"),
        pytest.param("a:port", id="port-not-digits"),
        pytest.param("a:1:2", id="two-ports"),
        pytest.param("[::1", id="unclosed-ip-literal"),
        pytest.param("[not-v6]", id="bad-ip-literal"),
        pytest.param("%zz", id="bad-percent"),
        pytest.param("[v1.fe80::a+en1]", id="ip-future-unsupported"),
        pytest.param("[fe80::1%25en0]", id="zone-id"),
    ],
)
async def test_an_invalid_host_is_400(port: int, host: str | tuple[str, ...] | None) -> None:
    """RFC 9112 3.2: a missing, repeated or malformed Host on HTTP/1.1 is answered 400."""
    response = await raw_request(port, "PUT", "/v1/stream/h", TEXT, host=host)
    assert response.status == 400, response.body
    assert (await raw_request(port, "HEAD", "/v1/stream/h")).status == 404


@pytest.mark.parametrize(
    "host",
    ["relay.example", "relay.example:8080", "127.0.0.1:1", "[::1]:80", "[::ffff:1.2.3.4]", "a%41"],
)
async def test_a_valid_host_is_served(port: int, host: str) -> None:
    response = await raw_request(port, "PUT", "/v1/stream/h", TEXT, host=host)
    assert response.status == 201, response.body


async def test_http_1_0_needs_no_host(port: int) -> None:
    response = await raw_request(port, "HEAD", "/v1/stream/text", host=None, version="HTTP/1.0")
    assert response.status == 200


@pytest.mark.parametrize("closed", [False, True])
async def test_an_old_etag_never_matches_a_stream_recreated_at_the_same_path(
    port: int, closed: bool
) -> None:
    """Same path, same length, different bytes: a 304 would keep the old stream's data.

    Not in conformance/: the spec only asks clients not to re-create a deleted path, and the
    reference server's ETag is built from the path, so it answers 304 here. Relay's ETag
    carries the stream's id, which a re-created path must not share with its predecessor.
    """
    extra = {"Stream-Closed": "true"} if closed else {}
    url = "/v1/stream/again"
    # Several incarnations, so that an id reused by any of them would show.
    for old, new in ((b"hello", b"world"), (b"world", b"again"), (b"again", b"hello")):
        if old == b"hello":
            assert (await raw_request(port, "PUT", url, {**TEXT, **extra}, old)).status == 201
        first = await raw_request(port, "GET", url + "?offset=-1")
        assert first.status == 200 and first.body == old
        assert (await raw_request(port, "DELETE", url)).status == 204
        assert (await raw_request(port, "PUT", url, {**TEXT, **extra}, new)).status == 201
        again = await raw_request(
            port, "GET", url + "?offset=-1", {"If-None-Match": first.headers["etag"]}
        )
        assert again.status == 200, again.headers
        assert again.body == new
