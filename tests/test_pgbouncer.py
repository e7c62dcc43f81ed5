"""Relay behind a real PgBouncer in transaction pooling mode (tests/pgbouncer.py).

The store contract suite and the many-relays tests run again here, with pooled work going
through PgBouncer (``--database-pooler transaction``) and LISTEN plus migrations on the direct
URL. PgBouncer keeps fewer server connections than a relay has clients, so consecutive
transactions of one client land in different server sessions: anything that leaned on session
state would fail here. The last tests show why the statement cache must be off and that
nothing is left behind in the sessions PgBouncer shares.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import asyncpg
import pytest

from relay import cli
from relay.store.base import Store
from relay.store.postgres.connections import pooled_options
from tests import test_many_relays, test_store_contract
from tests.auth_helpers import ALL, api_key_entry, bearer, write_json
from tests.pgbouncer import PgBouncer, pgbouncer
from tests.relay_process import RelayProcess, read_all
from tests.stores import Backend

__all__ = ["pgbouncer"]  # the fixture, imported so pytest finds it here

TEXT = {"Content-Type": "text/plain"}


def _tests_of(module: ModuleType) -> dict[str, Callable[..., Any]]:
    return {name: test for name, test in vars(module).items() if name.startswith("test_")}


# The same cases, collected again in this module, where the fixtures below open the store
# (``backend``, ``store``) and start the relays (``relays``) through PgBouncer.
globals().update(_tests_of(test_store_contract))
globals().update(_tests_of(test_many_relays))


def _pooled(bouncer: PgBouncer, pg_url: str) -> tuple[str, ...]:
    """``relay serve`` flags: pooled work through ``bouncer``, sessions on ``pg_url``."""
    return (
        "--database-url",
        bouncer.url,
        "--database-pooler",
        "transaction",
        "--direct-database-url",
        pg_url,
    )


@pytest.fixture
def backend(pgbouncer: PgBouncer, pg_url: str, tmp_path: Path) -> Backend:
    options = {"direct_url": pg_url, "pooler": "transaction"}
    return Backend("postgres-pgbouncer", tmp_path / "data", pgbouncer.url, options)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    async with backend.open() as opened:
        yield opened


@pytest.fixture
def relays(
    pgbouncer: PgBouncer, pg_url: str, tmp_path: Path
) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    with test_many_relays.relay_pair(tmp_path, *_pooled(pgbouncer, pg_url)) as pair:
        yield pair


async def _hop(url: str, options: dict[str, Any]) -> int:
    """Run one query twice on client connection ``b`` while the server session it was
    prepared in changes: ``a`` holds one session in a transaction, so ``b``'s first run gets
    another; once ``a`` commits, PgBouncer hands ``b`` the session ``a`` just released (it
    reuses the most recently released first)."""
    a = await asyncpg.connect(url, **options)
    b = await asyncpg.connect(url, **options)
    try:
        held = a.transaction()
        await held.start()
        await a.fetchval("SELECT 1")
        first: int = await b.fetchval("SELECT $1::int + 1", 1)
        await held.commit()
        second: int = await b.fetchval("SELECT $1::int + 1", first)
        return second
    finally:
        await a.close()
        await b.close()


async def test_asyncpg_s_statement_cache_breaks_behind_a_transaction_pooler(
    pgbouncer: PgBouncer,
) -> None:
    """Why ``--database-pooler transaction`` turns the cache off: a cached (named) statement
    lives in the session that prepared it, which the next transaction may not get."""
    with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="does not exist"):
        await _hop(pgbouncer.url, {})
    assert await _hop(pgbouncer.url, pooled_options("transaction")) == 3


async def test_a_pooled_relay_leaves_no_session_state_in_shared_sessions(
    pg_url: str, tmp_path: Path
) -> None:
    """A whole relay (store pool, committer, subscriptions, compaction, the revocation poll)
    and ``relay revoke`` through a PgBouncer with one server session: that session holds no
    prepared statement and no lock afterwards, and the relay's only session of its own is the
    direct one, listening."""
    keys = tmp_path / "keys.json"
    write_json(keys, {"keys": [api_key_entry("k-1", "ops", [{"path": "**", "actions": ALL}])]})
    bouncer = PgBouncer(pg_url, pool_size=1)
    bouncer.start()
    flags = _pooled(bouncer, pg_url)
    relay = RelayProcess(tmp_path / "data", *flags, "--auth-api-keys", str(keys))
    try:
        relay.start()
        assert await asyncio.to_thread(cli.main, ["revoke", *flags, "--jti", "leaked"]) == 0
        async with aiohttp.ClientSession(headers=bearer("k-1")) as http:
            base = f"{relay.url}/v1/stream"
            async with http.put(f"{base}/wake", json=[]) as created:
                assert created.status == 201
            wakes = {"type": "pull-wake", "pattern": "logs/*", "wake_stream": "wake"}
            async with http.put(f"{base}/__ds/subscriptions/indexer", json=wakes) as made:
                assert made.status == 201, await made.text()
            url = f"{base}/logs/a"
            async with http.put(url, headers=TEXT) as created:
                assert created.status == 201
            for word in (b"one ", b"two ", b"three"):
                async with http.post(url, data=word, headers=TEXT) as r:
                    assert r.status == 204
            assert await read_all(http, url) == b"one two three"
            # The subscription worker's wake, written through the pooler too.
            offset, seen = "-1", b""
            async with asyncio.timeout(10):
                while b'"wake"' not in seen:
                    params = {"offset": offset, "live": "long-poll"}
                    async with http.get(f"{base}/wake", params=params) as r:
                        seen += await r.read()
                        offset = r.headers["Stream-Next-Offset"]
        shared = await asyncpg.connect(bouncer.url, **pooled_options("transaction"))
        try:
            prepared = await shared.fetchval("SELECT count(*) FROM pg_prepared_statements")
            locks = await shared.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            )
        finally:
            await shared.close()
        direct = await asyncpg.connect(pg_url)
        try:
            sessions = await direct.fetch(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            )
        finally:
            await direct.close()
    finally:
        relay.stop()
        bouncer.stop()
    assert (prepared, locks) == (0, 0)
    # PgBouncer's one server session, and the relay's LISTEN connection (its last query is
    # the barrier's SELECT 1, or the LISTEN itself).
    assert len(sessions) == 2
    assert any(row["query"].startswith(("LISTEN", "SELECT 1")) for row in sessions)


def test_serve_through_a_pooler_without_a_direct_url_does_not_start(
    pgbouncer: PgBouncer, tmp_path: Path
) -> None:
    relay = RelayProcess(
        tmp_path / "data", "--database-url", pgbouncer.url, "--database-pooler", "transaction"
    )
    with pytest.raises(RuntimeError, match="exited with 2"):
        relay.start()
