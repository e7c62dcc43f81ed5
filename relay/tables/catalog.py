"""Relay's table-stream bookkeeping in the source database, and what it asks Postgres.

``relay_table_streams`` holds each declared table stream (its definition, whether its snapshot
has been taken, the snapshot, and the snapshot round), so a restart, another relay or the
``relay tables`` command sees the same set. One logical slot and one publication (both named
by ``--table-slot``) serve every table stream: a transaction touching two tables that feed one
stream must become one append, which separate slots could not order.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from relay.tables.plan import Snapshot
from relay.tables.spec import TableStream, parse

WAL_LEVEL_LINE = (
    "table streams need logical decoding, but wal_level is {level}: "
    "set wal_level = logical in postgresql.conf and restart Postgres"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS relay_table_streams (
    name text PRIMARY KEY,
    definition text NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'live')),
    snapshot text,
    round integer NOT NULL DEFAULT 0,
    added_at timestamptz NOT NULL DEFAULT now()
)
"""

LOCK = "SELECT pg_try_advisory_lock(hashtext('relay table streams: ' || $1))"

SLOT = """
SELECT confirmed_flush_lsn, wal_status,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS lag,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained
FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()
"""

PEEK = """
SELECT data FROM pg_logical_slot_peek_binary_changes(
    $1, NULL, $2, 'proto_version', '1', 'publication_names', $3)
"""

ADVANCE = "SELECT end_lsn FROM pg_replication_slot_advance($1, $2::text::pg_lsn)"


def lsn_text(lsn: int) -> str:
    """An LSN as Postgres writes it (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass(frozen=True, slots=True)
class Declared:
    """A row of ``relay_table_streams``."""

    spec: TableStream
    live: bool
    snapshot: Snapshot | None
    round: int


def quote(name: str) -> str:
    """An identifier, quoted (table names are checked by ``spec.parse`` too)."""
    return '"' + name.replace('"', '""') + '"'


def qualified(table: str) -> str:
    schema, name = table.split(".", 1)
    return f"{quote(schema)}.{quote(name)}"


async def check_wal_level(conn: asyncpg.Connection) -> str | None:
    """None when logical decoding is on, else the line to refuse start-up with."""
    level = await conn.fetchval("SHOW wal_level")
    return None if level == "logical" else WAL_LEVEL_LINE.format(level=level)


async def ensure_schema(conn: asyncpg.Connection) -> None:
    await conn.execute(SCHEMA)


async def any_declared(conn: asyncpg.Connection) -> bool:
    """Whether table streams were declared here before (``relay tables add``)."""
    if await conn.fetchval("SELECT to_regclass('relay_table_streams')") is None:
        return False
    found = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM relay_table_streams)")
    return bool(found)


async def declared(conn: asyncpg.Connection) -> list[Declared]:
    rows = await conn.fetch(
        "SELECT definition, state, snapshot, round FROM relay_table_streams ORDER BY name"
    )
    return [
        Declared(
            parse(row["definition"]),
            row["state"] == "live",
            Snapshot.parse(row["snapshot"]) if row["snapshot"] else None,
            row["round"],
        )
        for row in rows
    ]


async def declare(conn: asyncpg.Connection, spec: TableStream) -> bool:
    """Add a table stream (its snapshot pending) or update its definition (keeping its state:
    columns named from now on appear in the changes that follow). True when added."""
    added: bool = await conn.fetchval(
        """
        INSERT INTO relay_table_streams (name, definition) VALUES ($1, $2)
        ON CONFLICT (name) DO UPDATE SET definition = EXCLUDED.definition
        RETURNING (xmax = 0)
        """,
        spec.name,
        spec.render(),
    )
    return added


async def remove(conn: asyncpg.Connection, name: str) -> bool:
    result: str = await conn.execute("DELETE FROM relay_table_streams WHERE name = $1", name)
    return result != "DELETE 0"


async def problem_with(conn: asyncpg.Connection, spec: TableStream) -> str | None:
    """Why ``spec`` cannot be followed (no such table, no key, a missing column), else None.

    A table in a publication that has no replica identity refuses UPDATE and DELETE, so such
    a table is never added: the app's writes would break."""
    row = await conn.fetchrow(
        """
        SELECT c.oid, c.relreplident::text AS relreplident,
               EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS pk
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
        """,
        spec.schema_name,
        spec.table_name,
    )
    if row is None:
        return f"table {spec.table} does not exist"
    no_key = row["relreplident"] == "f" and not row["pk"] and not spec.key
    if no_key or row["relreplident"] == "n" or (row["relreplident"] == "d" and not row["pk"]):
        return (
            f"table {spec.table} has no key: add a primary key, or "
            f"ALTER TABLE {spec.table} REPLICA IDENTITY FULL"
        )
    names = set(await column_types(conn, spec))
    missing = [c for c in spec.columns if c not in names]
    if missing:
        return f"table {spec.table} has no column {missing[0]}"
    if row["relreplident"] != "f":
        identity = await identity_columns(conn, spec)
        hidden = [c for c in (*spec.path_columns, *spec.key) if c not in identity]
        if hidden:
            # A delete carries only the replica identity: it could not be routed or keyed.
            return (
                f"column {hidden[0]} (in the path or key) is not in {spec.table}'s replica "
                f"identity, so deletes would not carry it: ALTER TABLE {spec.table} "
                "REPLICA IDENTITY FULL"
            )
    return None


async def exists(conn: asyncpg.Connection, spec: TableStream) -> bool:
    found = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", qualified(spec.table))
    return bool(found)


async def column_types(conn: asyncpg.Connection, spec: TableStream) -> dict[str, int]:
    rows = await conn.fetch(
        """
        SELECT a.attname, a.atttypid::int AS oid FROM pg_attribute a
        WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        qualified(spec.table),
    )
    return {row["attname"]: row["oid"] for row in rows}


async def identity_columns(conn: asyncpg.Connection, spec: TableStream) -> list[str]:
    """The replica identity's columns (primary key by default, or the chosen index)."""
    rows = await conn.fetch(
        """
        SELECT a.attname FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        JOIN pg_class c ON c.oid = i.indrelid
        WHERE i.indrelid = to_regclass($1)
          AND ((c.relreplident IN ('d', 'f') AND i.indisprimary)
               OR (c.relreplident = 'i' AND i.indisreplident))
        ORDER BY array_position(i.indkey::int2[], a.attnum)
        """,
        qualified(spec.table),
    )
    return [row["attname"] for row in rows]


async def sync_publication(conn: asyncpg.Connection, name: str, tables: set[str]) -> None:
    """Make publication ``name`` cover exactly ``tables`` (dropped when there are none)."""
    exists = await conn.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", name)
    if not tables:
        if exists:
            await conn.execute(f"DROP PUBLICATION {quote(name)}")
        return
    current = {
        f"{row['schemaname']}.{row['tablename']}"
        for row in await conn.fetch(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1", name
        )
    }
    if exists and current == tables:
        return
    listed = ", ".join(qualified(t) for t in sorted(tables))
    verb = "ALTER PUBLICATION {} SET TABLE {}" if exists else "CREATE PUBLICATION {} FOR TABLE {}"
    await conn.execute(verb.format(quote(name), listed))


async def drop_slot(conn: asyncpg.Connection, slot: str) -> bool:
    """Drop the slot if it exists (it then retains no WAL). True when one was dropped."""
    dropped = await conn.fetchval(
        "SELECT count(*) FROM (SELECT pg_drop_replication_slot(slot_name)"
        " FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database())"
        " AS d",
        slot,
    )
    return bool(dropped)
