"""Edges of the grammar the spec and HTTP/1.1 state: extreme Stream-Expires-At values, the
reserved ``__ds/`` prefix, absolute-form request targets and the Host header.

Requests go over a raw socket (tests/raw_http.py) so nothing normalizes them on the way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

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
async def port(backend: Backend) -> AsyncIterator[int]:
    """A relay on each backend, with one text stream at ``/v1/stream/text``."""
    config = Config(data_dir=str(backend.data_dir), long_poll_timeout=0.2)
    store: Store = (
        SqliteStore(backend.data_dir) if backend.url is None else PostgresStore(backend.url)
    )
    server = TestServer(make_app(config, store))  # the app opens and closes the store
    await server.start_server()
    assert server.port is not None
    try:
        assert (await raw_request(server.port, "PUT", "/v1/stream/text", TEXT)).status == 201
        yield server.port
    finally:
        await server.close()


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
