"""Compressed answers (Accept-Encoding) and compressed request bodies (Content-Encoding)."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient
from backports import zstd

from relay.app import make_app
from relay.config import Config
from relay.http import compression
from relay.http.context import CONTEXT
from tests.raw_http import raw_request
from tests.waits import wait_for

JSON = {"Content-Type": "application/json"}
STREAM = "/v1/stream/chat"
TOKENS = [{"type": "token", "seq": n, "text": f" word{n % 17}"} for n in range(300)]

Serve = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def serve(aiohttp_client: Any, tmp_path: Path) -> Serve:
    """A relay on the embedded store whose client hands back bodies as sent (no decoding)."""

    async def go(**settings: Any) -> TestClient[Any, Any]:
        config = Config(data_dir=str(tmp_path / "data"), **settings)
        client: TestClient[Any, Any] = await aiohttp_client(make_app(config), auto_decompress=False)
        return client

    return go


async def chat(client: TestClient[Any, Any], path: str = STREAM) -> bytes:
    """A chat of 300 JSON tokens; returns the identity body of its catch-up read."""
    assert (await client.put(path, headers=JSON, data=orjson.dumps(TOKENS))).status == 201
    plain = await client.get(path, params={"offset": "-1"}, headers={"Accept-Encoding": ""})
    assert "Content-Encoding" not in plain.headers
    return await plain.read()


DECODE: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.decompress, "zstd": zstd.decompress}
PACK: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "zstd": zstd.compress,
}


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
async def test_a_catch_up_comes_compressed_in_the_coding_asked_for(
    serve: Serve, coding: str
) -> None:
    client = await serve()
    plain = await chat(client)
    answer = await client.get(STREAM, params={"offset": "-1"}, headers={"Accept-Encoding": coding})
    assert answer.status == 200
    assert answer.headers["Content-Encoding"] == coding
    assert answer.headers["Vary"] == "Accept-Encoding"
    body = await answer.read()
    assert len(body) < len(plain) / 4
    assert DECODE[coding](body) == plain
    assert orjson.loads(plain) == TOKENS


async def test_the_client_library_decodes_what_it_asked_for(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """aiohttp's own default (gzip, deflate, zstd) gets zstd and reads the same messages."""
    client = await aiohttp_client(make_app(Config(data_dir=str(tmp_path))))
    await client.put(STREAM, headers=JSON, data=orjson.dumps(TOKENS))
    answer = await client.get(STREAM, params={"offset": "-1"})
    assert answer.headers["Content-Encoding"] == "zstd"
    assert await answer.json() == TOKENS


async def test_each_coding_has_its_own_etag_and_304(serve: Serve) -> None:
    client = await serve()
    await chat(client)
    tags = {}
    for coding in ("gzip", "zstd", "identity"):
        answer = await client.get(
            STREAM, params={"offset": "-1"}, headers={"Accept-Encoding": coding}
        )
        tags[coding] = answer.headers["ETag"]
        assert answer.headers["Vary"] == "Accept-Encoding"  # identity answers vary too
    assert len(set(tags.values())) == 3
    for coding, tag in tags.items():
        again = await client.get(
            STREAM,
            params={"offset": "-1"},
            headers={"Accept-Encoding": coding, "If-None-Match": tag},
        )
        assert again.status == 304
        assert again.headers["ETag"] == tag
        assert again.headers["Vary"] == "Accept-Encoding"
    # A stored gzip body is not confirmed for a client that now takes only zstd.
    other = await client.get(
        STREAM,
        params={"offset": "-1"},
        headers={"Accept-Encoding": "zstd", "If-None-Match": tags["gzip"]},
    )
    assert other.status == 200
    assert other.headers["Content-Encoding"] == "zstd"


async def test_small_answers_and_binary_streams_go_as_they_are(serve: Serve) -> None:
    client = await serve(compress_min_bytes=2048)
    await client.put("/v1/stream/small", headers=JSON, data=b'[{"a":1}]')
    small = await client.get(
        "/v1/stream/small", params={"offset": "-1"}, headers={"Accept-Encoding": "gzip"}
    )
    assert "Content-Encoding" not in small.headers
    assert "Vary" not in small.headers  # its body is the same whatever the client takes
    blob = bytes(range(256)) * 64
    octets = {"Content-Type": "application/octet-stream"}
    await client.put("/v1/stream/bin", headers=octets, data=blob)
    binary = await client.get(
        "/v1/stream/bin", params={"offset": "-1"}, headers={"Accept-Encoding": "gzip"}
    )
    assert "Content-Encoding" not in binary.headers
    assert "Vary" not in binary.headers
    assert await binary.read() == blob
    ndjson = {"Content-Type": "application/x-ndjson"}
    await client.put("/v1/stream/nd", headers=ndjson, data=b'{"n":1}\n' * 500)
    lines = await client.get(
        "/v1/stream/nd", params={"offset": "-1"}, headers={"Accept-Encoding": "gzip"}
    )
    assert lines.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await lines.read()) == b'{"n":1}\n' * 500


async def test_compression_can_be_turned_off(serve: Serve) -> None:
    client = await serve(compress_min_bytes=0)
    await chat(client)
    answer = await client.get(STREAM, params={"offset": "-1"}, headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in answer.headers
    assert "Vary" not in answer.headers


async def test_a_long_poll_woken_by_a_large_commit_is_compressed_once_for_all(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await serve()
    tail = (await client.put(STREAM, headers=JSON)).headers["Stream-Next-Offset"]
    encodes = 0
    encode = compression.encode

    def counted(body: bytes, coding: str) -> bytes:
        nonlocal encodes
        encodes += 1
        return encode(body, coding)

    monkeypatch.setattr(compression, "encode", counted)
    params = {"offset": tail, "live": "long-poll"}
    gz = {"Accept-Encoding": "gzip"}
    polls = [asyncio.create_task(client.get(STREAM, params=params, headers=gz)) for _ in range(5)]
    hub = client.app[CONTEXT].hub
    await wait_for(lambda: hub.parked_readers == 5)
    assert (await client.post(STREAM, headers=JSON, data=orjson.dumps(TOKENS))).status == 204
    for poll in polls:
        answer = await poll
        assert answer.headers["Content-Encoding"] == "gzip"
        assert orjson.loads(gzip.decompress(await answer.read())) == TOKENS
    assert encodes == 1


async def test_sse_goes_uncompressed_whatever_the_client_takes(serve: Serve) -> None:
    client = await serve(sse_reconnect_interval=0.2)
    await chat(client)
    events = await client.get(
        STREAM, params={"offset": "-1", "live": "sse"}, headers={"Accept-Encoding": "gzip, zstd"}
    )
    assert "Content-Encoding" not in events.headers
    body = await events.read()  # the reconnect interval ends it
    assert body.startswith(b"event: data\n")
    assert b'"seq":299' in body


@pytest.mark.parametrize("coding", ["gzip", "deflate", "zstd"])
async def test_a_compressed_append_is_stored_decompressed(serve: Serve, coding: str) -> None:
    client = await serve()
    await client.put(STREAM, headers=JSON)
    raw = orjson.dumps(TOKENS)
    packed = PACK[coding](raw)
    sent = await client.post(STREAM, headers={**JSON, "Content-Encoding": coding}, data=packed)
    assert sent.status == 204
    answer = await client.get(STREAM, params={"offset": "-1"}, headers={"Accept-Encoding": ""})
    assert orjson.loads(await answer.read()) == TOKENS


# br is a coding aiohttp's parser knows; without Brotli installed it refuses it before Relay
# sees the request, and Relay's connection handler answers that refusal the same way.
UNDECODED = ["compress", "br-ish", "gzip, gzip"] + [
    coding for coding in ("br",) if coding not in compression.BODY_ENCODINGS
]


@pytest.mark.parametrize("coding", UNDECODED)
async def test_a_body_in_a_coding_relay_does_not_decode_is_415(serve: Serve, coding: str) -> None:
    client = await serve()
    await client.put(STREAM, headers=JSON)
    refused = await client.post(
        STREAM, headers={**JSON, "Content-Encoding": coding}, data=b"\x1f\x8b not json"
    )
    assert refused.status == 415
    assert refused.headers["Accept-Encoding"] == ", ".join(compression.BODY_ENCODINGS)
    error = orjson.loads(await refused.read())["error"]
    assert error["code"] == "unsupported_content_encoding"
    head = await client.head(STREAM)
    assert head.headers["Stream-Next-Offset"].endswith("0" * 16)  # nothing was stored


async def test_a_small_bomb_is_413_and_a_broken_body_400(serve: Serve) -> None:
    limit = 1024 * 1024
    client = await serve(max_body_bytes=limit)
    await client.put("/v1/stream/t", headers={"Content-Type": "text/plain"})
    bomb = gzip.compress(b"a" * (64 * limit))
    assert len(bomb) < limit / 4  # it passes the declared-length check
    port = client.port
    assert port is not None
    target = "/v1/stream/t"
    gz = {"Content-Type": "text/plain", "Content-Encoding": "gzip"}
    answer = await raw_request(port, "POST", target, gz, bomb)
    assert answer.status == 413
    assert answer.error_code() == "payload_too_large"
    broken = await raw_request(port, "POST", target, gz, b"\x1f\x8b\x08\x00garbage" * 10)
    assert broken.status == 400
    assert broken.error_code() == "invalid_body"
    head = await client.head(target)
    assert head.headers["Stream-Next-Offset"].endswith("0" * 16)


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, None),
        ("", None),
        ("identity", None),
        ("gzip", "gzip"),
        ("GZIP", "gzip"),
        ("gzip, deflate, br, zstd", "zstd"),  # ours on a tie
        ("gzip;q=1.0, zstd;q=0.5", "gzip"),
        ("zstd;q=0, gzip", "gzip"),
        ("zstd;q=0, gzip;q=0", None),
        ("*", "zstd"),
        ("*;q=0.5, gzip", "gzip"),
        ("gzip;q=0, *", "zstd"),
        ("br", None),
        ("gzip;q=banana", None),
    ],
)
def test_negotiation_follows_q_values(accept: str | None, chosen: str | None) -> None:
    assert compression.negotiate(accept) == chosen


@pytest.mark.parametrize(
    ("content_type", "compressible"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("text/plain", True),
        ("text/csv", True),
        ("application/x-ndjson", True),
        ("application/vnd.api+json", True),
        ("application/atom+xml", True),
        ("application/octet-stream", False),
        ("image/png", False),
        ("application/gzip", False),
        ("application/x-protobuf", False),
    ],
)
def test_which_types_are_compressed(content_type: str, compressible: bool) -> None:
    assert compression.compressible(content_type) is compressible
