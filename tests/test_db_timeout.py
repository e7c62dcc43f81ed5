"""A request waits for the database at most ``--db-timeout`` in total.

The link to Postgres hangs (a proxy that keeps every connection open and forwards nothing):
reads of a stream the relay knows, reads of one it must look up, and writes each answer 503
with Retry-After within about one timeout, not one per step they take (a barrier on the
LISTEN connection, a pool wait, a query).
"""

from __future__ import annotations

import time
from pathlib import Path

from pytest_aiohttp import AiohttpClient

from relay.app import make_app
from relay.config import Config
from relay.store.postgres import PostgresStore
from tests.tcp_proxy import TcpProxy

TIMEOUT = 2.0
TEXT = {"Content-Type": "text/plain"}


async def test_every_answer_on_a_frozen_link_comes_within_one_timeout(
    pg_url: str, tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    proxy, proxied = TcpProxy.for_url(pg_url)
    await proxy.start()
    config = Config(data_dir=str(tmp_path), database_url=proxied, db_timeout=TIMEOUT)
    store = PostgresStore(proxied, command_timeout=TIMEOUT)
    try:
        client = await aiohttp_client(make_app(config, store))
        assert (await client.put("/v1/stream/known", headers=TEXT)).status == 201
        assert (await client.put("/v1/stream/other", headers=TEXT)).status == 201
        assert (await client.head("/v1/stream/known")).status == 200
        proxy.freeze()
        slowest = 0.0
        requests = [
            (
                "HEAD",
                "/v1/stream/known",
            ),  # known: a barrier on the LISTEN connection, then a lookup
            ("GET", "/v1/stream/other?offset=-1"),  # unknown: a lookup on a pooled connection
            ("POST", "/v1/stream/known"),  # a write on the committer's connection
        ]
        for method, url in requests:
            started = time.monotonic()
            response = await client.request(method, url, data=b"x", headers=TEXT)
            took = time.monotonic() - started
            assert response.status == 503, (method, url)
            assert response.headers["Retry-After"].isdigit()
            slowest = max(slowest, took)
        # One timeout and scheduling slack; two waits of the timeout would be 4 s.
        assert slowest < TIMEOUT * 1.75, slowest
        proxy.thaw()
        await client.close()
    finally:
        await proxy.cut()
