"""What operators see: probes (/healthz, /readyz), /metrics and the shipped Grafana dashboard,
request ids, on both stores. Readiness with Postgres gone is checked through a TCP proxy cut."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT
from relay.store.postgres import PostgresStore
from tests.serving import AppClient
from tests.stores import Backend, backend
from tests.tcp_proxy import TcpProxy
from tests.waits import eventually, wait_for

__all__ = ["backend"]  # the fixture, imported so pytest finds it here

TEXT = {"Content-Type": "text/plain"}
DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "relay-dashboard.json"
POSTGRES_ONLY = frozenset(
    {
        "relay_store_pool_connections_in_use",
        "relay_store_pool_connections",
        "relay_store_listen_reconnects_total",
    }
)
"""What only a Postgres store has (a pool, LISTEN); every other metric is on both (the
compactor's too: SQLite merges an idle stream's rows as Postgres does)."""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config_for(backend: Backend, **settings: Any) -> Config:
    return Config(data_dir=str(backend.data_dir), database_url=backend.url or "", **settings)


async def samples(client: AppClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, frozenset(labels.items())), 0.0)


async def traffic(client: AppClient) -> None:
    """One of everything the dashboard plots: writes, catch-up, long-poll and SSE reads,
    a delete, an expiry, probes and a 404."""
    assert (await client.put("/v1/stream/a", headers=TEXT, data=b"hi")).status == 201
    assert (await client.post("/v1/stream/a", headers=TEXT, data=b" there")).status == 204
    read = await client.get("/v1/stream/a", params={"offset": "-1"})
    assert read.status == 200
    tail = read.headers["Stream-Next-Offset"]
    poll = await client.get("/v1/stream/a", params={"offset": tail, "live": "long-poll"})
    assert poll.status == 204  # the short long-poll timeout passed
    sse = await client.get("/v1/stream/a", params={"offset": "-1", "live": "sse"})
    assert b"data:hi there" in await asyncio.wait_for(sse.read(), 5)
    assert (await client.head("/v1/stream/a")).status == 200
    assert (await client.put("/v1/stream/gone", headers=TEXT)).status == 201
    assert (await client.delete("/v1/stream/gone")).status == 204
    ttl = {**TEXT, "Stream-TTL": "1"}
    assert (await client.put("/v1/stream/brief", headers=ttl)).status == 201
    assert (await client.get("/nowhere")).status == 404
    assert (await client.head("/nowhere")).status == 404
    not_allowed = await client.post("/healthz")
    assert not_allowed.status == 405
    assert not_allowed.headers["X-Request-Id"]
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200

    async def expired() -> bool:
        return value(await samples(client), "relay_streams_expired_total") >= 1

    await eventually(expired, timeout=15)


def fast(config: Config) -> Config:
    """``config`` with short long-polls, reconnects and reaps, so one test sees all of them."""
    return replace(config, long_poll_timeout=0.2, sse_reconnect_interval=0.3, reap_interval=0.05)


async def test_probes_answer_uncached_on_both_stores(
    backend: Backend, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(make_app(config_for(backend)))
    for path, body in (
        ("/healthz", {"status": "ok"}),
        ("/health", {"status": "ok"}),
        ("/readyz", {"status": "ready"}),
    ):
        response = await client.get(path)
        assert response.status == 200, path
        assert await response.json() == body
        assert response.headers["Cache-Control"] == "no-store"


async def test_readyz_is_503_while_the_schema_is_behind(
    backend: Backend, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(make_app(config_for(backend)))
    if backend.url is None:
        with sqlite3.connect(backend.data_dir / "relay.sqlite3") as db:
            db.execute("PRAGMA user_version = 0")
    else:
        conn = await asyncpg.connect(backend.url)
        try:
            await conn.execute("DELETE FROM relay_schema_version")
        finally:
            await conn.close()
    response = await client.get("/readyz")
    assert response.status == 503
    assert response.headers["Cache-Control"] == "no-store"
    body = await response.json()
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("schema at version 0, this relay needs ")
    assert (await client.get("/healthz")).status == 200  # alive, just not ready


async def test_readyz_is_503_while_postgres_is_unreachable_and_ready_again_after(
    pg_url: str, tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    proxy, url = TcpProxy.for_url(pg_url)
    await proxy.start()
    try:
        config = Config(data_dir=str(tmp_path), database_url=url, db_timeout=1.0)
        app = make_app(config)
        client = await aiohttp_client(app)
        assert (await client.get("/readyz")).status == 200
        store = app[CONTEXT].store
        assert isinstance(store, PostgresStore)
        # LISTEN is up: a cut now loses it, and restoring it is a reconnect.
        await wait_for(lambda: store._listening, what="LISTEN up")
        await proxy.cut()
        response = await client.get("/readyz")
        assert response.status == 503
        assert response.headers["Cache-Control"] == "no-store"
        body = await response.json()
        assert body["status"] == "unavailable"
        assert body["reason"].startswith("database unavailable")
        assert (await client.get("/healthz")).status == 200
        got = await samples(client)
        assert value(got, "relay_store_errors_total", kind="unavailable") >= 1
        await proxy.restore()

        async def ready_and_listening_again() -> bool:
            if (await client.get("/readyz")).status != 200:
                return False
            return value(await samples(client), "relay_store_listen_reconnects_total") >= 1

        await eventually(ready_and_listening_again, timeout=15)
    finally:
        await proxy.cut()


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's PromQL expressions query."""
    found: set[str] = set()

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                names = set(re.findall(r"\b(?:relay|process)_[a-z0-9_]+", target["expr"]))
                assert names, target["expr"]  # every query reads at least one metric
                found.update(names)

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


async def test_every_metric_the_dashboard_queries_is_exported(
    backend: Backend, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(make_app(fast(config_for(backend))))
    await traffic(client)
    exported = {name for name, _ in await samples(client)}
    wanted = dashboard_metrics()
    assert len(wanted) >= 20
    if backend.url is None:
        assert not (wanted - POSTGRES_ONLY) - exported
        assert not POSTGRES_ONLY & exported  # what SQLite has not, it does not pretend to
    else:
        assert not wanted - exported
        got = await samples(client)
        assert value(got, "relay_store_pool_connections") >= 1
        assert (
            0
            <= value(got, "relay_store_pool_connections_in_use")
            <= value(got, "relay_store_pool_connections")
        )


async def test_requests_are_counted_by_route_and_timed_by_kind(
    backend: Backend, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(make_app(fast(config_for(backend))))
    await traffic(client)
    got = await samples(client)
    count = "relay_http_requests_total"
    assert value(got, count, method="PUT", route="stream", status="201") == 3
    assert value(got, count, method="POST", route="stream", status="204") == 1
    assert value(got, count, method="DELETE", route="stream", status="204") == 1
    assert value(got, count, method="GET", route="stream", status="204") == 1  # the long-poll
    assert value(got, count, method="GET", route="other", status="404") == 1
    assert value(got, count, method="HEAD", route="other", status="404") == 1
    assert value(got, count, method="POST", route="other", status="405") == 1
    assert value(got, count, method="GET", route="health", status="200") == 1
    assert value(got, count, method="GET", route="ready", status="200") == 1
    assert value(got, count, method="GET", route="metrics", status="200") >= 1
    timed = "relay_http_request_duration_seconds_count"
    assert value(got, timed, kind="write") == 5  # three PUTs, a POST, a DELETE
    assert value(got, timed, kind="read") == 2  # the catch-up GET and the HEAD
    live = "relay_http_live_read_duration_seconds"
    assert value(got, f"{live}_count", mode="long-poll") == 1
    assert value(got, f"{live}_count", mode="sse") == 1
    # The long-poll was held for its 0.2 s timeout: it lands in the live histogram only.
    assert value(got, f"{live}_bucket", mode="long-poll", le="0.1") == 0
    assert value(got, "relay_live_readers", mode="long-poll") == 0
    assert value(got, "relay_live_readers", mode="sse") == 0
    assert value(got, "relay_streams_created_total") == 3
    assert value(got, "relay_streams_deleted_total") == 1
    assert value(got, "relay_streams_expired_total") == 1
    assert value(got, "relay_appended_bytes_total") == len(b"hi there")


async def test_group_commit_histograms_count_every_commit(
    backend: Backend, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(make_app(config_for(backend)))
    assert (await client.put("/v1/stream/g", headers=TEXT)).status == 201
    posts = [client.post("/v1/stream/g", headers=TEXT, data=b"x") for _ in range(40)]
    assert {r.status for r in await asyncio.gather(*posts)} == {204}
    got = await samples(client)
    commits = value(got, "relay_store_commits_total")
    assert value(got, "relay_store_batch_operations_count") == commits
    assert value(got, "relay_store_commit_duration_seconds_count") == commits
    assert value(got, "relay_store_batch_operations_sum") >= 41  # the create, every append
    assert value(got, "relay_store_batch_operations_bucket", le="+Inf") == commits
    assert value(got, "relay_store_queue_depth") == 0
    assert value(got, "relay_store_errors_total", kind="unavailable") == 0
    assert value(got, "relay_store_errors_total", kind="failed") == 0


async def test_a_sane_request_id_is_echoed_and_any_other_replaced(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(make_app(fast(Config(data_dir=str(tmp_path)))))
    given = await client.put("/v1/stream/r", headers={**TEXT, "X-Request-Id": "trace-42:a.b_c"})
    assert given.headers["X-Request-Id"] == "trace-42:a.b_c"
    generated = set()
    for bad in ("has space", "x" * 65, "semi;colon", ""):
        response = await client.get("/healthz", headers={"X-Request-Id": bad})
        assert response.headers["X-Request-Id"] != bad
        generated.add(response.headers["X-Request-Id"])
    response = await client.get("/healthz")
    generated.add(response.headers["X-Request-Id"])
    assert len(generated) == 5  # each request its own
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]+", rid) for rid in generated)
    sse = await client.get(
        "/v1/stream/r", params={"offset": "-1", "live": "sse"}, headers={"X-Request-Id": "s-1"}
    )
    assert sse.headers["X-Request-Id"] == "s-1"  # streamed responses carry it too
    await sse.read()
    missing = await client.get("/v1/stream/none", headers={"X-Request-Id": "e-1"})
    assert missing.status == 404
    assert missing.headers["X-Request-Id"] == "e-1"  # and errors
