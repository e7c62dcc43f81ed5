"""Table streams against a real Postgres with ``wal_level=logical`` (a private cluster): row
changes arrive once, per transaction and in commit order, across kills of the relay and of
Postgres and with two relays; the snapshot agrees with the changes after it; bad input has
defined behaviour; the slot goes when the table streams do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from protocol.state import fold
from relay.store.postgres import migrate
from tests.pg import ThrowawayCluster, _bin_dir, _with_database
from tests.pg import _execute as sql
from tests.relay_process import RelayProcess

pytestmark = pytest.mark.skipif(
    _bin_dir() is None, reason="needs Postgres server binaries (initdb, pg_ctl)"
)

Message = dict[str, Any]
LOGICAL = {"wal_level": "logical", "max_replication_slots": "20", "max_wal_senders": "20"}


@pytest.fixture(scope="module")
def logical() -> Iterator[ThrowawayCluster]:
    cluster = ThrowawayCluster(LOGICAL)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def db(logical: ThrowawayCluster) -> Iterator[str]:
    """A fresh, migrated database on the logical cluster."""
    admin = f"postgresql://relay@127.0.0.1:{logical.port}/postgres"
    name = f"t_{uuid.uuid4().hex[:10]}"

    async def create() -> None:
        conn = await asyncpg.connect(admin)
        await conn.execute(f"CREATE DATABASE {name}")
        await conn.close()
        await migrate(_with_database(admin, name))

    asyncio.run(create())
    yield _with_database(admin, name)


def relay_for(
    tmp_path: Path,
    url: str,
    *streams: str,
    extra: tuple[str, ...] = (),
    store: str = "postgres",
) -> RelayProcess:
    """A relay following ``url``'s tables; its streams in that database, or (``store`` is
    sqlite) in the embedded store under ``tmp_path``."""
    slot = url.rpartition("/")[2]  # slot names are the cluster's: one per database here
    where = "--database-url" if store == "postgres" else "--table-database-url"
    args: list[str] = [where, url, "--table-poll-interval", "0.05", "--table-slot", slot]
    for stream in streams:
        args += ["--table-stream", stream]
    return RelayProcess(tmp_path, *args, *extra, log=tmp_path / "relay.log")


async def read_messages(http: aiohttp.ClientSession, url: str) -> list[Message]:
    """Every message of a JSON stream (empty when it does not exist yet)."""
    out: list[Message] = []
    offset = "-1"
    while True:
        async with http.get(url, params={"offset": offset}) as r:
            if r.status == 404:
                return out
            assert r.status == 200, await r.text()
            out += json.loads(await r.read())
            offset = r.headers["Stream-Next-Offset"]
            if r.headers.get("Stream-Up-To-Date") == "true":
                return out


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Until ``check()`` holds; the timeout only ends a hung test (never a timing claim)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def messages_when(
    http: aiohttp.ClientSession, url: str, done: Callable[[list[Message]], bool]
) -> list[Message]:
    found: list[Message] = []

    async def check() -> bool:
        nonlocal found
        found = await read_messages(http, url)
        return done(found)

    await wait_for(check, f"messages at {url}")
    return found


def changes(messages: list[Message]) -> list[Message]:
    return [m for m in messages if "operation" in m["headers"]]


def metric(relay: RelayProcess, name: str, labels: str = "") -> float:
    """A sample's value summed over label sets (those containing ``labels``); -1 if absent."""
    try:
        with urllib.request.urlopen(f"{relay.url}/metrics", timeout=5) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as exc:  # 503 while --workers are still starting
        if exc.code != 503:
            raise
        return -1.0
    except urllib.error.URLError:  # a worker's listener still opening (refused or reset)
        return -1.0
    found = [
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {" and labels in line
    ]
    return sum(found) if found else -1.0


@contextlib.asynccontextmanager
async def running(relay: RelayProcess) -> AsyncIterator[aiohttp.ClientSession]:
    await asyncio.to_thread(relay.start)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
            yield http
    finally:
        await asyncio.to_thread(relay.stop)


MESSAGES = (
    "CREATE TABLE messages (id text PRIMARY KEY, chat_id text NOT NULL, body text,"
    " secret text, n numeric, at timestamptz, meta jsonb, raw bytea, ok boolean)",
    "ALTER TABLE messages REPLICA IDENTITY FULL",  # deletes carry chat_id, the path column
)
MESSAGES_STREAM = (
    "messages:chat/{chat_id}/state:type=message:key=id:columns=id,chat_id,body,n,at,meta,raw,ok"
)


async def test_a_transaction_arrives_as_one_append_in_commit_order_with_its_txid(
    db: str, tmp_path: Path
) -> None:
    await sql(db, *MESSAGES, "INSERT INTO messages (id, chat_id, body) VALUES ('m0', 'c1', 'hi')")
    relay = relay_for(tmp_path, db, MESSAGES_STREAM)
    url = f"{relay.url}/v1/stream/chat/c1/state"
    async with running(relay) as http:
        first = await messages_when(http, url, lambda ms: len(ms) == 3)
        assert [m["headers"] for m in first] == [
            {"control": "snapshot-start"},
            {"operation": "insert", "txid": first[1]["headers"]["txid"]},
            {"control": "snapshot-end"},
        ]
        appends_before = metric(relay, "relay_store_appends_total")
        conn = await asyncpg.connect(db)
        async with conn.transaction():
            txid = await conn.fetchval("SELECT pg_current_xact_id()::xid::text")
            await conn.execute(
                "INSERT INTO messages VALUES ('m1', 'c1', 'a', 's', 12345678901234567890.5,"
                " '2024-05-01 12:00:00.25+02', '{\"k\": [1, 2]}', '\\x0102ff', true)"
            )
            await conn.execute("INSERT INTO messages (id, chat_id, body) VALUES ('m2', 'c1', 'b')")
            await conn.execute("UPDATE messages SET body = 'a2' WHERE id = 'm1'")
            await conn.execute("DELETE FROM messages WHERE id = 'm0'")
        await conn.close()
        found = await messages_when(http, url, lambda ms: len(ms) == 7)
        assert metric(relay, "relay_store_appends_total") == appends_before + 1
    txn = found[3:]
    assert [(m["headers"]["operation"], m["key"]) for m in txn] == [
        ("insert", "m1"),
        ("insert", "m2"),
        ("update", "m1"),
        ("delete", "m0"),
    ]
    assert {m["headers"]["txid"] for m in txn} == {txid}
    assert txn[0]["value"] == {
        "id": "m1",
        "chat_id": "c1",
        "body": "a",  # not secret: only named columns are sent
        "n": "12345678901234567890.5",
        "at": "2024-05-01T10:00:00.25Z",
        "meta": {"k": [1, 2]},
        "raw": "AQL/",
        "ok": True,
    }
    assert txn[0]["type"] == "message"


CHATS = (
    "CREATE TABLE items (id int PRIMARY KEY, chat text NOT NULL, v int NOT NULL);"
    " ALTER TABLE items REPLICA IDENTITY FULL"
)
ITEMS_STREAM = "items:chat/{chat}/items:type=item:columns=id,chat,v"


def once_each(messages: list[Message]) -> None:
    """No entity is inserted twice without a delete between (a duplicate or a replay)."""
    present: set[tuple[str, str]] = set()
    for m in messages:
        if m["headers"].get("control") == "reset":
            present.clear()
        if "operation" not in m["headers"]:
            continue
        key, operation = (m["type"], m["key"]), m["headers"]["operation"]
        if operation == "insert":
            assert key not in present, f"{key} inserted twice"
            present.add(key)
        elif operation == "delete":
            present.discard(key)
        else:
            assert key in present, f"{key} updated before its insert"


async def table_rows(url: str, chat: str) -> dict[tuple[str, str], Any]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, chat, v FROM items WHERE chat = $1", chat)
    finally:
        await conn.close()
    return {("item", str(r["id"])): {"id": r["id"], "chat": r["chat"], "v": r["v"]} for r in rows}


async def caught_up(
    http: aiohttp.ClientSession, relay: RelayProcess, db: str, chat: str
) -> list[Message]:
    """Wait until the stream folds to exactly the table's rows; then check nothing repeated."""
    url = f"{relay.url}/v1/stream/chat/{chat}/items"
    found: list[Message] = []

    async def same() -> bool:
        nonlocal found
        found = await read_messages(http, url)
        return fold(found) == await table_rows(db, chat)

    try:
        await wait_for(same, f"chat {chat} to match the table", timeout=60)
    finally:
        want, got = await table_rows(db, chat), fold(found)
        print("missing", {k: v for k, v in want.items() if got.get(k) != v})
        print("extra", {k: v for k, v in got.items() if want.get(k) != v})
    once_each(found)
    return found


async def test_the_snapshot_agrees_with_the_changes_after_it_under_concurrent_writes(
    db: str, tmp_path: Path
) -> None:
    await sql(
        db, CHATS, "INSERT INTO items SELECT g, 'c' || (g % 3), 0 FROM generate_series(1, 60) g"
    )
    stop = asyncio.Event()
    commits = 0

    async def writer(n: int) -> None:
        nonlocal commits
        conn = await asyncpg.connect(db)
        i = 0
        try:
            while not stop.is_set():
                i += 1
                async with conn.transaction():
                    key = 1000 * (n + 1) + i
                    await conn.execute("INSERT INTO items VALUES ($1, $2, 0)", key, f"c{i % 3}")
                    await conn.execute("UPDATE items SET v = v + 1 WHERE id = $1", 1 + (i * 7) % 60)
                    await asyncio.sleep(0.005)  # open while the snapshot may be taken
                    await conn.execute("DELETE FROM items WHERE id = $1", key - 3)
                commits += 1
        finally:
            await conn.close()

    writers = [asyncio.create_task(writer(n)) for n in range(3)]
    await wait_for(lambda: asyncio.sleep(0, commits > 10), "writers to start")
    relay = relay_for(tmp_path, db, ITEMS_STREAM)
    async with running(relay) as http:
        # The snapshot is taken while the writers commit; then changes follow.
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_snapshot_rows_total") > 0),
            "the snapshot",
        )
        started = commits
        await wait_for(
            lambda: asyncio.sleep(0, commits > started + 30), "writes after the snapshot"
        )
        stop.set()
        await asyncio.gather(*writers)
        for chat in ("c0", "c1", "c2"):
            await caught_up(http, relay, db, chat)


async def insert_items(db: str, first: int, count: int, chat: str = "c0") -> None:
    """``count`` transactions, one row each."""
    conn = await asyncpg.connect(db)
    try:
        for i in range(first, first + count):
            await conn.execute("INSERT INTO items VALUES ($1, $2, 0)", i, chat)
    finally:
        await conn.close()


def in_commit_order(messages: list[Message]) -> None:
    """Rows inserted one per transaction in id order arrive in that order."""
    ids = [int(m["key"]) for m in changes(messages) if m["headers"]["operation"] == "insert"]
    assert ids == sorted(ids)


@pytest.mark.parametrize("store", ["postgres", "sqlite"])
async def test_a_relay_killed_between_its_appends_and_the_slot_advance_applies_each_once(
    db: str, tmp_path: Path, store: str
) -> None:
    """On either store: the Stream-Seq is committed with the append, in the store's own
    transaction, wherever the store is."""
    await sql(db, CHATS)
    relay = relay_for(tmp_path, db, ITEMS_STREAM, store=store)
    url = f"{relay.url}/v1/stream/chat/c0/items"
    async with running(relay) as http:
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_following") == 1), "following"
        )
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_slot_lag_bytes") >= 0), "the slot"
        )
        killed_mid_batch = False
        first = 1
        for _ in range(5):
            # Written while the relay is down, so it finds them as one batch; the slot moves
            # only after the batch's last append, so a kill seen mid-batch comes before it.
            before = len(changes(await read_messages(http, url)))
            await asyncio.to_thread(relay.kill)
            await insert_items(db, first, 300)
            first += 300
            await asyncio.to_thread(relay.start)
            def grew(ms: list[dict[str, Any]], n: int = before) -> bool:
                return len(changes(ms)) > n

            partial = await messages_when(http, url, grew)
            if len(changes(partial)) < first - 1:
                await asyncio.to_thread(relay.kill)
                killed_mid_batch = True
                await asyncio.to_thread(relay.start)
                break
            await caught_up(http, relay, db, "c0")
        assert killed_mid_batch, "every batch was done before the kill (machine too fast?)"
        found = await caught_up(http, relay, db, "c0")
        replayed = metric(relay, "relay_table_transactions_total", 'outcome="already_applied"')
        assert replayed > 0  # the replay happened, and the store refused it
    in_commit_order(found)


@contextlib.asynccontextmanager
async def writing(db: str, chat: str = "c0") -> AsyncIterator[Callable[[], int]]:
    """One writer committing a row per transaction, ids in commit order, riding out outages
    (a transaction whose commit was cut off may or may not have committed: the table says)."""
    stop = asyncio.Event()
    done = 0

    async def write() -> None:
        nonlocal done
        i = 100000
        while not stop.is_set():
            try:
                conn = await asyncpg.connect(db, timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                await asyncio.sleep(0.05)
                continue
            try:
                while not stop.is_set():
                    i += 1
                    await conn.execute("INSERT INTO items VALUES ($1, $2, 0)", i, chat)
                    done += 1
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass
            finally:
                conn.terminate()

    task = asyncio.create_task(write())
    try:
        yield lambda: done
    finally:
        stop.set()
        await task


async def more_commits(count: Callable[[], int], how_many: int) -> None:
    start = count()
    await wait_for(lambda: asyncio.sleep(0, count() >= start + how_many), "commits")


async def test_a_postgres_crash_loses_no_change_and_repeats_none(
    logical: ThrowawayCluster, db: str, tmp_path: Path
) -> None:
    await sql(db, CHATS)
    relay = relay_for(tmp_path, db, ITEMS_STREAM, extra=("--db-timeout", "2"))
    async with running(relay) as http:
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_following") == 1), "following"
        )
        async with writing(db) as count:
            await more_commits(count, 100)
            await asyncio.to_thread(logical.crash)  # pg_ctl -m immediate: no checkpoint
            await asyncio.to_thread(logical.resume)
            await more_commits(count, 100)
        found = await caught_up(http, relay, db, "c0")
    in_commit_order(found)


async def test_two_relays_one_follows_and_the_other_takes_over_when_it_is_killed(
    db: str, tmp_path: Path
) -> None:
    await sql(db, CHATS)
    relays = [
        relay_for(tmp_path / name, db, ITEMS_STREAM, extra=("--data-dir", str(tmp_path / name)))
        for name in ("a", "b")
    ]
    for relay in relays:
        relay.data_dir.mkdir(parents=True, exist_ok=True)
    async with running(relays[0]) as http, running(relays[1]):

        def follower() -> int | None:
            states = [metric(r, "relay_table_following") for r in relays]
            return states.index(1.0) if states.count(1.0) == 1 else None

        await wait_for(lambda: asyncio.sleep(0, follower() is not None), "one follower")
        first = follower()
        assert first is not None
        survivor = relays[1 - first]
        async with writing(db) as count:
            await more_commits(count, 100)
            await asyncio.to_thread(relays[first].kill)
            await wait_for(
                lambda: asyncio.sleep(0, metric(survivor, "relay_table_following") == 1), "takeover"
            )
            await more_commits(count, 100)
        found = await caught_up(http, survivor, db, "c0")
    in_commit_order(found)


NOTES = (
    "CREATE TABLE notes (id int PRIMARY KEY, chat text, body text);"
    " ALTER TABLE notes REPLICA IDENTITY FULL"
)
NOTES_STREAM = "notes:chat/{chat}/notes:type=note:columns=id,chat,body"


async def test_bad_rows_truncate_and_a_dropped_table_are_logged_and_counted_never_stuck(
    db: str, tmp_path: Path
) -> None:
    await sql(db, CHATS, NOTES)
    relay = relay_for(tmp_path, db, ITEMS_STREAM, NOTES_STREAM)
    notes = f"{relay.url}/v1/stream/chat/ok/notes"
    async with running(relay) as http:
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_following") == 1), "following"
        )
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_slot_lag_bytes") >= 0), "the slot"
        )
        # Null, slash, dot-dot and control characters make no valid path: each change is skipped.
        await sql(
            db,
            "INSERT INTO notes VALUES (1, NULL, 'x'), (2, 'a/b', 'x'), (3, '..', 'x'),"
            " (4, E'a\\nb', 'x'), (5, '', 'x')",
            "INSERT INTO notes VALUES (6, 'ok', 'first')",
        )
        await messages_when(http, notes, lambda ms: [m["key"] for m in changes(ms)] == ["6"])
        assert metric(relay, "relay_table_problems_total", 'reason="path"') == 5
        # TRUNCATE sends nothing (the paths it empties are unknown); later changes follow.
        await sql(db, "TRUNCATE notes", "INSERT INTO notes VALUES (7, 'ok', 'after')")
        await messages_when(http, notes, lambda ms: len(changes(ms)) == 2)
        assert metric(relay, "relay_table_problems_total", 'reason="truncate"') == 1
        # A named column dropped: changes go on without it.
        await sql(db, "ALTER TABLE notes DROP COLUMN body", "INSERT INTO notes VALUES (8, 'ok')")
        found = await messages_when(http, notes, lambda ms: len(changes(ms)) == 3)
        assert changes(found)[-1]["value"] == {"id": 8, "chat": "ok"}
        assert metric(relay, "relay_table_problems_total", 'reason="column"') >= 1
        # A dropped table: its stream stops, the others go on.
        await sql(db, "DROP TABLE notes", "INSERT INTO items VALUES (1, 'c0', 0)")
        await caught_up(http, relay, db, "c0")
        await wait_for(
            lambda: asyncio.sleep(
                0, metric(relay, "relay_table_problems_total", 'reason="table"') >= 1
            ),
            "the dropped table noticed",
        )
        await sql(db, "INSERT INTO items VALUES (2, 'c0', 0)")
        await caught_up(http, relay, db, "c0")


def serve_fails(tmp_path: Path, url: str, *streams: str) -> str:
    """Run ``relay serve`` expecting it to refuse to start; its log."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    relay = relay_for(tmp_path, url, *streams)
    with pytest.raises(RuntimeError, match="exited with 1"):
        relay.start()
    return (tmp_path / "relay.log").read_text()


async def test_start_up_is_refused_with_one_line_for_a_table_it_cannot_follow(
    db: str, tmp_path: Path
) -> None:
    await sql(
        db,
        "CREATE TABLE keyless (a text, b text)",
        "CREATE TABLE narrow (id int PRIMARY KEY, chat text)",  # chat not in the identity
    )
    cases = {
        "keyless:k/{a}:columns=a,b": "has no key: add a primary key, or ALTER TABLE",
        "narrow:c/{chat}:columns=id,chat": "REPLICA IDENTITY FULL",
        "missing:m/{id}:columns=id": "table public.missing does not exist",
        "narrow:n/{id}:columns=id,nope": "has no column nope",
    }
    for n, (stream, line) in enumerate(cases.items()):
        log = serve_fails(tmp_path / str(n), db, stream)
        assert line in log, log


def test_start_up_is_refused_when_wal_level_is_not_logical(pg_url: str, tmp_path: Path) -> None:
    """The shared server runs with wal_level=replica."""
    log = serve_fails(tmp_path, pg_url, ITEMS_STREAM)
    assert "set wal_level = logical in postgresql.conf and restart Postgres" in log
    assert "wal_level is replica" in log


def relay_command(url: str, slot: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "relay", "tables", "--database-url", url]
    return subprocess.run(
        [*command, "--table-slot", slot, *args], capture_output=True, text=True, timeout=60
    )


async def slots(db: str) -> list[str]:
    conn = await asyncpg.connect(db)
    try:
        rows = await conn.fetch(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        )
        return [r["slot_name"] for r in rows]
    finally:
        await conn.close()


async def test_tables_add_starts_a_stream_and_drop_of_the_last_drops_the_slot(
    db: str, tmp_path: Path
) -> None:
    await sql(db, CHATS, NOTES, "INSERT INTO notes VALUES (1, 'x', 'before')")
    relay = relay_for(tmp_path, db, ITEMS_STREAM)
    slot = db.rpartition("/")[2]
    async with running(relay) as http:
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_slot_lag_bytes") >= 0), "the slot"
        )
        added = await asyncio.to_thread(relay_command, db, slot, "add", NOTES_STREAM)
        assert added.returncode == 0, added.stderr
        # Its snapshot comes first, then its changes.
        await sql(db, "INSERT INTO notes VALUES (2, 'x', 'after')")
        found = await messages_when(
            http, f"{relay.url}/v1/stream/chat/x/notes", lambda ms: len(changes(ms)) == 2
        )
        assert [m["headers"].get("control") for m in found][:1] == ["snapshot-start"]
        listed = await asyncio.to_thread(relay_command, db, slot, "list")
        assert "public.notes:chat/{chat}/notes\tlive" in listed.stdout
        assert f"slot {slot}: lag" in listed.stdout
        for name in ("public.notes:chat/{chat}/notes", "public.items:chat/{chat}/items"):
            dropped = await asyncio.to_thread(relay_command, db, slot, "drop", name)
            assert dropped.returncode == 0, dropped.stderr

        async def no_slot() -> bool:
            return await slots(db) == []

        await wait_for(no_slot, "the slot dropped")
        conn = await asyncpg.connect(db)
        assert await conn.fetchval("SELECT count(*) FROM pg_publication") == 0
        await conn.close()


async def test_readyz_is_503_while_the_slot_retains_more_wal_than_the_bound(
    db: str, tmp_path: Path
) -> None:
    await sql(db, CHATS)
    relay = relay_for(tmp_path, db, ITEMS_STREAM, extra=("--table-max-retained-bytes", "1"))
    async with running(relay) as http:

        async def retained() -> bool:
            return metric(relay, "relay_table_slot_retained_bytes") > 1

        await sql(db, "INSERT INTO items VALUES (1, 'c0', 0)")
        await wait_for(retained, "the slot to retain WAL")
        async with http.get(f"{relay.url}/readyz") as r:
            assert r.status == 503
            assert "retains" in (await r.json())["reason"]
        assert metric(relay, "relay_table_slot_lag_bytes") >= 0


async def test_a_lost_slot_restarts_every_stream_with_reset_and_a_new_snapshot(
    db: str, tmp_path: Path
) -> None:
    await sql(db, CHATS, "INSERT INTO items VALUES (1, 'c0', 0), (2, 'c0', 0)")
    relay = relay_for(tmp_path, db, ITEMS_STREAM)
    slot = db.rpartition("/")[2]
    async with running(relay) as http:
        await caught_up(http, relay, db, "c0")
    # Days later: the slot is gone (dropped, or invalidated by max_slot_wal_keep_size), and
    # the table changed meanwhile with nobody following.
    await sql(
        db,
        f"SELECT pg_drop_replication_slot('{slot}')",
        "DELETE FROM items WHERE id = 1",
        "INSERT INTO items VALUES (3, 'c0', 0)",
    )
    async with running(relay) as http:
        found = await caught_up(http, relay, db, "c0")
    controls = [m["headers"].get("control") for m in found if "control" in m["headers"]]
    assert controls == ["snapshot-start", "snapshot-end", "reset", "snapshot-start", "snapshot-end"]


async def test_two_tables_feeding_one_stream_share_each_transaction_as_one_append(
    db: str, tmp_path: Path
) -> None:
    await sql(
        db,
        "CREATE TABLE chats (id text PRIMARY KEY, title text NOT NULL)",
        "CREATE TABLE msgs (id text PRIMARY KEY, chat_id text NOT NULL, body text);"
        " ALTER TABLE msgs REPLICA IDENTITY FULL",
    )
    relay = relay_for(
        tmp_path,
        db,
        "chats:chat/{id}/state:type=chat:columns=id,title",
        "msgs:chat/{chat_id}/state:type=message:columns=id,chat_id,body",
    )
    url = f"{relay.url}/v1/stream/chat/c1/state"
    async with running(relay) as http:
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_slot_lag_bytes") >= 0), "the slot"
        )
        before = metric(relay, "relay_store_appends_total")
        conn = await asyncpg.connect(db)
        async with conn.transaction():
            await conn.execute("INSERT INTO chats VALUES ('c1', 'Hello')")
            await conn.execute("INSERT INTO msgs VALUES ('m1', 'c1', 'hi')")
            await conn.execute("UPDATE chats SET title = 'Hello again' WHERE id = 'c1'")
        await conn.close()
        found = await messages_when(http, url, lambda ms: len(ms) == 3)
        assert metric(relay, "relay_store_appends_total") == before + 1
    assert [(m["type"], m["headers"]["operation"]) for m in found] == [
        ("chat", "insert"),
        ("message", "insert"),
        ("chat", "update"),
    ]
    assert fold(found) == {
        ("chat", "c1"): {"id": "c1", "title": "Hello again"},
        ("message", "m1"): {"id": "m1", "chat_id": "c1", "body": "hi"},
    }


async def test_under_workers_one_process_follows_and_changes_arrive_once(
    db: str, tmp_path: Path
) -> None:
    await sql(db, CHATS)
    relay = relay_for(tmp_path, db, ITEMS_STREAM, extra=("--workers", "2"))
    async with running(relay) as http:
        # /metrics adds up the workers: exactly one of them holds the lock.
        await wait_for(
            lambda: asyncio.sleep(0, metric(relay, "relay_table_following") == 1), "following"
        )
        await insert_items(db, 1, 50)
        found = await caught_up(http, relay, db, "c0")
        assert metric(relay, "relay_table_following") == 1
    in_commit_order(found)


async def stream_state(db: str) -> list[str]:
    conn = await asyncpg.connect(db)
    try:
        return [r["state"] for r in await conn.fetch("SELECT state FROM relay_table_streams")]
    finally:
        await conn.close()


async def test_a_relay_killed_mid_snapshot_retakes_it_after_a_reset(
    db: str, tmp_path: Path
) -> None:
    chats = 1500
    await sql(
        db,
        CHATS,
        f"INSERT INTO items SELECT g, 'c' || (g % {chats}), 0"
        f" FROM generate_series(1, {chats * 4}) g",
    )
    relay = relay_for(tmp_path, db, ITEMS_STREAM)
    probe = f"{relay.url}/v1/stream/chat/c1/items"
    killed_mid_snapshot = False
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            await asyncio.to_thread(relay.start)

            async def some_snapshot_appended() -> bool:
                return (await http.head(probe)).status == 200 or await stream_state(db) == ["live"]

            await wait_for(some_snapshot_appended, "the snapshot to begin")
            await asyncio.to_thread(relay.kill)
            if await stream_state(db) == ["pending"]:
                killed_mid_snapshot = True
                break
            await sql(
                db,
                "TRUNCATE relay_table_streams",
                f"SELECT pg_drop_replication_slot('{db.rpartition('/')[2]}')",
            )
        assert killed_mid_snapshot, "the snapshot was done before the kill (machine too fast?)"
        # Rows deleted between the attempts must not linger where the first attempt put them.
        await sql(
            db, "DELETE FROM items WHERE chat = 'c1'", "INSERT INTO items VALUES (0, 'c1', 7)"
        )
        async with running(relay) as http2:
            for chat in ("c1", "c2", f"c{chats - 1}"):
                found = await caught_up(http2, relay, db, chat)
                controls = [m["headers"]["control"] for m in found if "control" in m["headers"]]
                assert controls[-3:] == ["reset", "snapshot-start", "snapshot-end"]


async def test_a_table_stream_compacts_itself_by_policy(db: str, tmp_path: Path) -> None:
    """One row updated many times: the stream's history passes the policy's bound, Relay folds
    it into a snapshot (the horizon moves), and the stream still folds to the table."""
    await sql(db, CHATS, "INSERT INTO items VALUES (1, 'c0', 0)")
    policy = ("--table-compact-min-bytes", "4096", "--table-compact-ratio", "4")
    relay = relay_for(tmp_path, db, ITEMS_STREAM, extra=policy)
    async with running(relay) as http:
        url = f"{relay.url}/v1/stream/chat/c0/items"
        await caught_up(http, relay, db, "c0")
        conn = await asyncpg.connect(db)
        try:
            for v in range(1, 200):  # about 60 bytes a change: well past 4 KiB
                await conn.execute("UPDATE items SET v = $1 WHERE id = 1", v)
        finally:
            await conn.close()
        found = await caught_up(http, relay, db, "c0")
        async with http.head(url) as head:
            retained = head.headers.get("Stream-Retained-From")
        assert retained is not None  # the horizon moved: a compaction happened
        assert len(changes(found)) < 100  # a late reader gets a snapshot, not 200 changes
        assert metric(relay, "relay_table_compactions_total") >= 1
