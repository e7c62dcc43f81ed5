"""Postgres for the chat example's tests: a private cluster with ``wal_level=logical`` (the
relay's table streams need it; the shared test server runs ``replica``), a fresh database on
it per test, and queries on the example's tables in either of its databases.

The fixtures are bound into a test module by assignment (``logical_pg = chat_pg.logical_pg``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from examples.chat.backend.metadata import TABLE_STREAMS, create_tables
from tests.pg import ThrowawayCluster, _bin_dir, _with_database

LOGICAL = {"wal_level": "logical", "max_replication_slots": "10", "max_wal_senders": "10"}


@pytest.fixture(scope="module")
def logical_pg() -> Iterator[str]:
    """The cluster's admin URL."""
    if _bin_dir() is None:
        pytest.skip("needs Postgres server binaries (initdb, pg_ctl)")
    cluster = ThrowawayCluster(LOGICAL)
    admin = cluster.start()
    try:
        yield admin
    finally:
        cluster.stop()


@pytest.fixture
def chat_db(logical_pg: str) -> str:
    """A fresh, empty database on the logical cluster."""
    name = f"chat_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        admin = await asyncpg.connect(logical_pg)
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()

    asyncio.run(create())
    return _with_database(logical_pg, name)


def prepare(database_url: str) -> list[str]:
    """Create the chat tables (a table stream's table must exist before the relay starts) and
    return the relay's table-stream flags, as `examples/chat/run` does; one slot per
    database (slot names are the cluster's)."""

    async def create() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await create_tables(conn)
        finally:
            await conn.close()

    asyncio.run(create())
    flags = ["--table-slot", database_url.rpartition("/")[2]]
    for definition in TABLE_STREAMS:
        flags += ["--table-stream", definition]
    return flags


def rows(database: str, sql: str, *args: object) -> list[dict[str, Any]]:
    """The rows ``sql`` (``$n`` placeholders) selects in Postgres, or in the SQLite file
    ``database`` names when it is a path."""
    if not database.startswith("postgresql://"):
        with contextlib.closing(sqlite3.connect(database)) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql.replace("$", "?"), args)]

    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(database)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(fetch())
