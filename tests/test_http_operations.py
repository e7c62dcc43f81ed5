"""What operators and browsers see: health, Prometheus metrics, CORS and security headers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from relay.app import make_app
from relay.config import Config
from relay.store.sqlite import SqliteStore
from tests.serving import AppClient

TEXT = {"Content-Type": "text/plain"}


async def _client(aiohttp_client: AiohttpClient, config: Config) -> AppClient:
    return await aiohttp_client(make_app(config, SqliteStore(Path(config.data_dir))))


@pytest.fixture
async def client(tmp_path: Path, aiohttp_client: AiohttpClient) -> AppClient:
    return await _client(aiohttp_client, Config(data_dir=str(tmp_path)))


async def test_health(client: AppClient) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert (await response.json())["status"] == "ok"


async def test_metrics_count_requests_and_commits(client: AppClient) -> None:
    await client.put("/v1/stream/m", headers=TEXT)
    for _ in range(3):
        await client.post("/v1/stream/m", data=b"x", headers=TEXT)
    text = await (await client.get("/metrics")).text()
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["relay_store_appends_total"] == 3
    assert 1 <= samples["relay_store_commits_total"] <= 4
    assert any(name.startswith("relay_http_requests_total") for name in samples)


async def test_any_origin_may_read_every_stream_header(client: AppClient) -> None:
    created = await client.put("/v1/stream/c", headers={**TEXT, "Origin": "https://app.example"})
    assert created.headers["Access-Control-Allow-Origin"] == "*"
    exposed = {v.strip() for v in created.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Stream-Next-Offset", "Stream-Cursor", "Stream-Closed", "ETag"} <= exposed
    assert created.headers["X-Content-Type-Options"] == "nosniff"


async def test_preflight_allows_protocol_methods_and_headers(client: AppClient) -> None:
    response = await client.options(
        "/v1/stream/c",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "producer-id, x-custom",
        },
    )
    assert response.status == 204
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "producer-epoch" in allowed and "x-custom" in allowed


async def test_a_configured_origin_list_is_enforced(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    config = Config(data_dir=str(tmp_path), cors_origins="https://ok.example")
    client = await _client(aiohttp_client, config)
    ok = await client.get("/health", headers={"Origin": "https://ok.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    assert ok.headers["Vary"] == "Origin"
    other = await client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_sse_connections_end_after_the_reconnect_interval(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    """So CDNs can collapse SSE requests: the server ends each connection on a schedule, after
    a control event the client resumes from."""
    config = Config(data_dir=str(tmp_path), sse_reconnect_interval=0.3)
    client = await _client(aiohttp_client, config)
    await client.put("/v1/stream/s", headers=TEXT, data=b"hi")
    response = await client.get("/v1/stream/s", params={"offset": "-1", "live": "sse"})
    body = await asyncio.wait_for(response.read(), 5)  # EOF: the server ended it
    last = body.decode().rstrip("\n").split("\n")[-1]
    assert last.startswith("data:")
    control = json.loads(last[5:])
    tail = (await client.head("/v1/stream/s")).headers["Stream-Next-Offset"]
    assert control["streamNextOffset"] == tail
    assert "streamClosed" not in control
    assert b"data:hi" in body
