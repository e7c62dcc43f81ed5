"""Bad input: every rejection is the spec's 4xx with a JSON error body; nothing is a 500 or a hang.

Requests go over a raw socket so that nothing normalizes them on the way. A hypothesis test
throws arbitrary header values at every method and checks no answer is a 5xx.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpServer

from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT
from relay.store.sqlite import SqliteStore
from tests.raw_http import raw_request
from tests.relay_process import RelayProcess
from tests.waits import wait_for

TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def server(tmp_path: Path, aiohttp_server: AiohttpServer) -> TestServer:
    config = Config(
        data_dir=str(tmp_path), max_body_bytes=1000, max_path_length=64, long_poll_timeout=0.2
    )
    server = await aiohttp_server(make_app(config, SqliteStore(tmp_path)))
    assert server.port is not None
    for path, headers in (("/v1/stream/text", TEXT), ("/v1/stream/json", JSON)):
        assert (await raw_request(server.port, "PUT", path, headers)).status == 201
    return server


@pytest.fixture
def port(server: TestServer) -> int:
    assert server.port is not None
    return server.port


REJECTIONS = [
    # (id, method, target, headers, body, status, code)
    ("dot-dot", "GET", "/v1/stream/a/../text", {}, b"", 400, "invalid_path"),
    ("encoded-dot-dot", "PUT", "/v1/stream/a/%2e%2e/b", TEXT, b"", 400, "invalid_path"),
    ("dot-segment", "PUT", "/v1/stream/./b", TEXT, b"", 400, "invalid_path"),
    ("nul", "PUT", "/v1/stream/a%00b", TEXT, b"", 400, "invalid_path"),
    ("control-char", "PUT", "/v1/stream/a%0Ab", TEXT, b"", 400, "invalid_path"),
    ("bad-percent", "PUT", "/v1/stream/a%zzb", TEXT, b"", 400, "invalid_path"),
    ("truncated-percent", "PUT", "/v1/stream/ab%4", TEXT, b"", 400, "invalid_path"),
    ("invalid-utf8", "PUT", "/v1/stream/%ff%fe", TEXT, b"", 400, "invalid_path"),
    ("too-long", "PUT", "/v1/stream/" + "a" * 80, TEXT, b"", 400, "path_too_long"),
    ("empty-name", "PUT", "/v1/stream/", TEXT, b"", 400, "invalid_path"),
    ("body-too-large", "POST", "/v1/stream/text", TEXT, b"x" * 1001, 413, None),
    ("create-too-large", "PUT", "/v1/stream/big", TEXT, b"x" * 1001, 413, None),
    ("invalid-json", "POST", "/v1/stream/json", JSON, b"{nope", 400, None),
    ("invalid-utf8-json", "POST", "/v1/stream/json", JSON, b'"\xff"', 400, None),
    ("empty-json-array", "POST", "/v1/stream/json", JSON, b"[]", 400, None),
    ("json-nan", "POST", "/v1/stream/json", JSON, b"NaN", 400, None),
    ("invalid-initial-json", "PUT", "/v1/stream/j2", JSON, b"[1,", 400, None),
    ("empty-append", "POST", "/v1/stream/text", TEXT, b"", 400, None),
    ("content-type-mismatch", "POST", "/v1/stream/text", JSON, b"{}", 409, None),
    ("missing-stream", "POST", "/v1/stream/missing", TEXT, b"x", 404, None),
    ("ttl-negative", "PUT", "/v1/stream/t1", {**TEXT, "Stream-TTL": "-1"}, b"", 400, None),
    ("ttl-decimal", "PUT", "/v1/stream/t2", {**TEXT, "Stream-TTL": "1.5"}, b"", 400, None),
    ("ttl-leading-zero", "PUT", "/v1/stream/t3", {**TEXT, "Stream-TTL": "01"}, b"", 400, None),
    ("ttl-word", "PUT", "/v1/stream/t4", {**TEXT, "Stream-TTL": "soon"}, b"", 400, None),
    (
        "expires-not-rfc3339",
        "PUT",
        "/v1/stream/t5",
        {**TEXT, "Stream-Expires-At": "tomorrow"},
        b"",
        400,
        None,
    ),
    (
        "ttl-and-expires",
        "PUT",
        "/v1/stream/t6",
        {**TEXT, "Stream-TTL": "60", "Stream-Expires-At": "2030-01-01T00:00:00Z"},
        b"",
        400,
        None,
    ),
    ("offset-garbage", "GET", "/v1/stream/text?offset=zzz", {}, b"", 400, None),
    ("live-without-offset", "GET", "/v1/stream/text?live=long-poll", {}, b"", 400, None),
    ("live-unknown", "GET", "/v1/stream/text?offset=-1&live=websocket", {}, b"", 400, None),
    ("producer-partial", "POST", "/v1/stream/text", {**TEXT, "Producer-Id": "p"}, b"x", 400, None),
    (
        "producer-epoch-huge",
        "POST",
        "/v1/stream/text",
        {**TEXT, "Producer-Id": "p", "Producer-Epoch": "9" * 30, "Producer-Seq": "0"},
        b"x",
        400,
        None,
    ),
    (
        "fork-missing-source",
        "PUT",
        "/v1/stream/f1",
        {**TEXT, "Stream-Forked-From": "/v1/stream/nope"},
        b"",
        404,
        None,
    ),
    (
        "fork-offset-garbage",
        "PUT",
        "/v1/stream/f2",
        {**TEXT, "Stream-Forked-From": "/v1/stream/text", "Stream-Fork-Offset": "x"},
        b"",
        400,
        None,
    ),
    ("unknown-method", "PATCH", "/v1/stream/text", TEXT, b"x", 405, None),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "status", "code"),
    [pytest.param(*row[1:], id=row[0]) for row in REJECTIONS],
)
async def test_bad_requests_get_the_spec_status_and_a_json_error(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str | None,
) -> None:
    response = await raw_request(port, method, target, headers, body)
    assert response.status == status, response.body
    assert response.headers["content-type"].startswith("application/json")
    found = response.error_code()
    assert found
    if code is not None:
        assert found == code
    if status == 405:
        assert "POST" in response.headers["allow"]
    # Nothing was written by a rejected request.
    read = await raw_request(port, "GET", "/v1/stream/text?offset=-1")
    assert read.body == b""


async def test_a_client_that_disconnects_mid_upload_appends_nothing(
    server: TestServer, port: int
) -> None:
    limits = server.app[CONTEXT].limits
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/stream/text HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\n"
        "Content-Length: 900\r\n\r\n"
    )
    writer.write(head.encode() + b"partial" * 10)
    await writer.drain()
    await wait_for(lambda: limits.writes == 1, what="the append admitted, awaiting its body")
    writer.transport.abort()
    await wait_for(lambda: limits.writes == 0, what="the cut-off append finished")
    read = await raw_request(port, "GET", "/v1/stream/text?offset=-1")
    assert read.status == 200
    assert read.body == b""
    assert read.headers["stream-next-offset"].endswith("0000000000000000")


async def test_head_errors_carry_no_body(port: int) -> None:
    response = await raw_request(port, "HEAD", "/v1/stream/missing")
    assert response.status == 404
    assert response.body == b""


@pytest.fixture(scope="module")
def relay_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A relay process: the hypothesis test is synchronous, so the server needs its own loop."""
    relay = RelayProcess(
        tmp_path_factory.mktemp("fuzz"),
        "--long-poll-timeout",
        "0.2",
        "--sse-reconnect-interval",
        "0.2",
        "--max-body-bytes",
        "1000",
    )
    relay.start()
    try:
        for path, headers in (("/v1/stream/text", TEXT), ("/v1/stream/json", JSON)):
            asyncio.run(raw_request(relay.port, "PUT", path, headers))
        yield relay.port
    finally:
        relay.stop()


HEADER_NAMES = [
    "Stream-TTL",
    "Stream-Expires-At",
    "Stream-Seq",
    "Stream-Closed",
    "Producer-Id",
    "Producer-Epoch",
    "Producer-Seq",
    "Stream-Forked-From",
    "Stream-Fork-Offset",
    "Stream-Fork-Sub-Offset",
    "If-None-Match",
    "Content-Type",
]
printable = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
QUERIES = [
    "",
    "?offset=-1",
    "?offset=now&live=sse",
    "?offset={v}",
    "?offset=-1&cursor={v}",
    "?offset=now&live=long-poll&cursor={v}",
]


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE"]),
    name=st.sampled_from(["text", "json", "fresh", "fresh/child"]),
    query=st.sampled_from(QUERIES),
    headers=st.dictionaries(st.sampled_from(HEADER_NAMES), printable, max_size=4),
    body=st.binary(max_size=64),
)
def test_no_header_value_produces_a_server_error(
    relay_port: int, method: str, name: str, query: str, headers: dict[str, str], body: bytes
) -> None:
    value = quote(next(iter(headers.values()), "x"), safe="")
    target = f"/v1/stream/{name}" + query.format(v=value)
    response = asyncio.run(raw_request(relay_port, method, target, headers, body))
    assert response.status < 500, (response.status, response.body)
