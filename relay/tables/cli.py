"""``relay tables list|add|drop``: the declared table streams, in the database they follow.

A running relay picks up what these change within a poll: an added table stream starts with
its snapshot, a dropped one stops, and when none is left the slot is dropped (so it retains
no WAL) along with the publication.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from relay import config as config_mod
from relay.tables import catalog
from relay.tables.spec import parse

SETTINGS = ("database_url", "direct_database_url", "table_database_url", "table_slot")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tables = commands.add_parser(
        "tables",
        help="list, add or drop table streams (Postgres row changes as State Protocol streams)",
        description="Table streams are kept in relay_table_streams in the database of "
        "--table-database-url (default: --direct-database-url, else --database-url).",
    )
    config_mod.add_arguments(tables, SETTINGS)
    actions = tables.add_subparsers(dest="tables_action", required=True)
    actions.add_parser("list", help="the table streams, their state and the slot's lag")
    add = actions.add_parser("add", help="declare a table stream (its snapshot comes first)")
    add.add_argument("definition", help="TABLE:PATH:columns=A,B[:type=T][:key=K]")
    drop = actions.add_parser("drop", help="stop a table stream (its streams stay)")
    drop.add_argument("name", help="TABLE:PATH as list shows it")


def run(config: config_mod.Config, args: argparse.Namespace) -> int:
    if not config.tables_url:
        print("relay: tables needs --database-url or --table-database-url", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(config, args))
    except (ValueError, OSError, asyncpg.PostgresError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1


async def _run(config: config_mod.Config, args: argparse.Namespace) -> int:
    conn = await asyncpg.connect(config.tables_url, timeout=max(config.db_timeout, 1.0))
    try:
        await catalog.ensure_schema(conn)
        if args.tables_action == "add":
            return await _add(conn, args.definition)
        if args.tables_action == "drop":
            return await _drop(conn, config.table_slot, args.name)
        return await _list(conn, config.table_slot)
    finally:
        await conn.close()


async def _add(conn: asyncpg.Connection, definition: str) -> int:
    spec = parse(definition)
    refusal = await catalog.check_wal_level(conn)
    problem = refusal or await catalog.problem_with(conn, spec)
    if problem is not None:
        print(f"relay: {problem}", file=sys.stderr)
        return 1
    added = await catalog.declare(conn, spec)
    print(f"{'added' if added else 'updated'} {spec.name}")
    return 0


async def _drop(conn: asyncpg.Connection, slot: str, name: str) -> int:
    if not await catalog.remove(conn, name):
        print(f"relay: no table stream {name}", file=sys.stderr)
        return 1
    left = await catalog.declared(conn)
    tables = {d.spec.table for d in left if await catalog.exists(conn, d.spec)}
    if tables or not left:  # as the follower does: kept while table streams remain
        await catalog.sync_publication(conn, slot, tables)
    print(f"dropped {name}")
    if not left:
        for _ in range(50):  # a relay may be reading the slot this instant
            try:
                await catalog.drop_slot(conn, slot)
                print(f"dropped slot {slot}")
                break
            except asyncpg.ObjectInUseError:
                await asyncio.sleep(0.1)
        else:
            print(f"slot {slot} is in use: the relay following it drops it", file=sys.stderr)
    return 0


async def _list(conn: asyncpg.Connection, slot: str) -> int:
    row = await conn.fetchrow(catalog.SLOT, slot)
    for d in await catalog.declared(conn):
        state = "live" if d.live else "snapshot pending"
        print(f"{d.spec.name}\t{state}\t{d.spec.render()}")
    if row is not None:
        print(f"slot {slot}: lag {row['lag']} bytes, retains {row['retained']} bytes of WAL")
    return 0
