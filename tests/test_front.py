"""The request front (relay/http/front.py): routing, Expect, probe methods and the headers on
every answer, the same whether the app is served as ``relay serve`` serves it (``RelayRunner``,
no aiohttp router) or by a plain ``AppRunner`` through its catch-all route."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from relay.app import make_app
from relay.config import Config
from relay.http.front import RelayRunner
from tests.raw_http import raw_request

RUNNERS = {"relay-runner": RelayRunner, "app-runner": web.AppRunner}


@pytest.fixture(params=list(RUNNERS))
async def port(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[int]:
    config = Config(data_dir=str(tmp_path), cors_origins="https://app.example")
    runner = RUNNERS[request.param](make_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def _exchange(port: int, head: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Send ``head``; once an interim answer arrives send ``body``; return (interim, rest)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if interim.startswith(b"HTTP/1.1 100"):
            writer.write(body)
            rest = await asyncio.wait_for(reader.read(), 10)
        else:
            rest = b""
        return interim, rest
    finally:
        writer.close()


async def _expecting_append(port: int, name: str, length: int, extra: str = "") -> bytes:
    """Create ``/v1/stream/<name>``; the head of a POST to it that waits for 100 Continue."""
    created = await raw_request(port, "PUT", f"/v1/stream/{name}", {"Content-Type": "text/plain"})
    assert created.status == 201
    return (
        f"POST /v1/stream/{name} HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {length}\r\nExpect: 100-continue\r\n{extra}\r\n"
    ).encode()


async def test_expect_100_continue_gets_one_interim_answer_then_the_append(port: int) -> None:
    head = await _expecting_append(port, "e", 5, "Connection: close\r\n")
    interim, rest = await _exchange(port, head, b"hello")
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 204"), rest  # not a second 100 Continue
    read = await raw_request(port, "GET", "/v1/stream/e?offset=-1")
    assert read.body == b"hello"


async def test_a_body_refused_before_it_is_read_is_never_invited(port: int) -> None:
    """413 by the declared length: the final answer comes instead of ``100 Continue``, and it
    ends the connection, so a body sent anyway is never read as a request."""
    head = await _expecting_append(port, "big", 99_999_999)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"\r\nConnection: close\r\n" in answer


async def test_a_control_body_is_invited_too(port: int) -> None:
    body = b'{"type": "webhook", "pattern": "a/*", "webhook": {"url": "http://localhost:1/h"}}'
    head = (
        b"PUT /v1/stream/__ds/subscriptions/s1 HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    interim, rest = await _exchange(port, head, body)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith((b"HTTP/1.1 2", b"HTTP/1.1 4")), rest


async def test_an_unknown_expectation_is_417_and_nothing_is_appended(port: int) -> None:
    assert (
        await raw_request(port, "PUT", "/v1/stream/x", {"Content-Type": "text/plain"})
    ).status == 201
    response = await raw_request(
        port, "POST", "/v1/stream/x", {"Content-Type": "text/plain", "Expect": "teapot"}, b"hi"
    )
    assert response.status == 417
    assert (await raw_request(port, "GET", "/v1/stream/x?offset=-1")).body == b""


@pytest.mark.parametrize("path", ["/healthz", "/health", "/readyz", "/metrics"])
async def test_probes_answer_get_and_head_and_refuse_other_methods(port: int, path: str) -> None:
    assert (await raw_request(port, "GET", path)).status == 200
    assert (await raw_request(port, "HEAD", path)).status == 200
    refused = await raw_request(port, "POST", path, body=b"x")
    assert refused.status == 405
    assert refused.headers["allow"] == "GET, HEAD"
    assert refused.error_code() == "method_not_allowed"


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/stream", "/healthz/x", "/v2/stream/a"])
async def test_unknown_paths_are_a_json_404(port: int, path: str) -> None:
    response = await raw_request(port, "GET", path)
    assert response.status == 404
    assert response.error_code() == "not_found"
    assert response.headers["cache-control"] == "no-store"
    head = await raw_request(port, "HEAD", path)
    assert head.status == 404 and head.body == b""


async def test_every_answer_carries_the_common_headers(port: int) -> None:
    """Whole answers, errors and a streamed (SSE) one alike."""
    origin = {"Origin": "https://app.example", "X-Request-Id": "req-7"}
    text = {"Content-Type": "text/plain", **origin}
    answers = [
        await raw_request(port, "PUT", "/v1/stream/h", text),
        await raw_request(port, "GET", "/v1/stream/nope?offset=-1", origin),
        await raw_request(port, "GET", "/healthz", origin),
        await raw_request(port, "GET", "/nowhere", origin),
    ]
    await raw_request(port, "POST", "/v1/stream/h", text, b"x")
    await raw_request(port, "POST", "/v1/stream/h", {**text, "Stream-Closed": "true"})
    answers.append(await raw_request(port, "GET", "/v1/stream/h?offset=-1&live=sse", origin))
    assert [a.status for a in answers] == [201, 404, 200, 404, 200]
    assert b"data:x" in answers[-1].body.replace(b" ", b"")
    for answer in answers:
        assert answer.headers["x-request-id"] == "req-7"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "Stream-Next-Offset" in answer.headers["access-control-expose-headers"]


async def test_a_cors_preflight_names_the_methods_and_requested_headers(port: int) -> None:
    response = await raw_request(
        port,
        "OPTIONS",
        "/v1/stream/any",
        {"Origin": "https://app.example", "Access-Control-Request-Headers": "x-custom"},
    )
    assert response.status == 204
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"].endswith(", x-custom")
    other = await raw_request(port, "OPTIONS", "/v1/stream/any", {"Origin": "https://evil"})
    assert "access-control-allow-origin" not in other.headers


async def test_requests_are_counted_under_their_route(port: int) -> None:
    await raw_request(port, "GET", "/healthz")
    await raw_request(port, "GET", "/nowhere")
    await raw_request(port, "GET", "/v1/stream/__ds/nothing")
    text = (await raw_request(port, "GET", "/metrics")).body.decode()
    counted = {
        line.split(" ")[0]
        for line in text.splitlines()
        if line.startswith("relay_http_requests_total{")
    }
    assert any('route="health"' in line and 'status="200"' in line for line in counted)
    assert any('route="other"' in line and 'status="404"' in line for line in counted)
    assert any('route="subscriptions"' in line and 'status="404"' in line for line in counted)
