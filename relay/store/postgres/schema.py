"""The Postgres schema: migrations (``sql/postgres/NNN_*.sql``, or ``schema.sql`` in one
step for an empty database) and the CLI commands that need only the schema."""

from __future__ import annotations

from importlib import resources

import asyncpg

from relay.store.common import numbered_sql

MIGRATION_LOCK = 0x52454C4159  # pg_advisory_lock key: "RELAY"


def migrations() -> list[tuple[int, str]]:
    """``sql/postgres/NNN_name.sql``, in order: how an existing database reaches the newest."""
    return numbered_sql("postgres")


def _schema() -> str:
    """``sql/postgres/schema.sql``: the newest schema in one piece, for empty databases."""
    return (resources.files("relay.store") / "sql" / "postgres" / "schema.sql").read_text()


async def apply_migrations(conn: asyncpg.Connection, *, fresh_from_schema: bool = True) -> int:
    """Bring the schema to the newest version; safe when several relays start at once.

    An empty database gets ``schema.sql`` in one step (and every migration recorded as
    applied); an older one runs the migrations it lacks. A test proves both paths end in the
    same schema. ``fresh_from_schema=False`` forces the step-by-step path (for that test).
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS relay_schema_version (version INT PRIMARY KEY)"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM relay_schema_version")
        steps = migrations()
        if current == 0 and fresh_from_schema:
            async with conn.transaction():
                await conn.execute(_schema())
                await conn.executemany(
                    "INSERT INTO relay_schema_version VALUES ($1)", [(v,) for v, _ in steps]
                )
            return steps[-1][0]
        for version, sql in steps:
            if version <= current:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO relay_schema_version VALUES ($1)", version)
            current = version
        return int(current)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def migrate(url: str) -> int:
    """``relay migrate``: apply migrations and report the schema version."""
    conn = await asyncpg.connect(url)
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()


async def revoke(url: str, kind: str, value: str) -> None:
    """``relay revoke``: add a credential to ``relay_revocations`` (polled by every relay)."""
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
        await conn.execute(
            "INSERT INTO relay_revocations (kind, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            kind,
            value,
        )
    finally:
        await conn.close()
