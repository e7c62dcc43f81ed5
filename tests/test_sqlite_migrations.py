"""The embedded store's schema is versioned: old data directories are upgraded in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from protocol.append import AppendRequest
from protocol.create import CreateRequest
from protocol.lifecycle import Expiry
from relay.store.sqlite import SqliteStore, migrate, migrations

NOW = 1_800_000_000.0


def _legacy_directory(path: Path) -> None:
    """A data directory as Relay wrote it before schema versions: 001's tables, user_version 0,
    and a deleted stream whose id (3) SQLite would hand out again."""
    path.mkdir()
    conn = sqlite3.connect(path / "relay.sqlite3")
    conn.executescript(dict(migrations())[1])
    for stream_id, name in ((1, "kept"), (2, "other"), (3, "deleted")):
        conn.execute(
            "INSERT INTO streams (id, path, content_type, tail, last_access, created_at) "
            "VALUES (?, ?, 'text/plain', 5, ?, ?)",
            (stream_id, name, NOW, NOW),
        )
        conn.execute("INSERT INTO chunks VALUES (?, 0, 5, ?)", (stream_id, b"hello"))
    conn.execute("DELETE FROM streams WHERE id = 3")  # its chunks were left behind
    conn.commit()
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    conn.close()


def _schema(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
    ).fetchall()


async def test_an_old_data_directory_is_upgraded_and_keeps_its_streams(tmp_path: Path) -> None:
    data = tmp_path / "old"
    _legacy_directory(data)
    store = SqliteStore(data)
    await store.open()
    try:
        meta = await store.head("kept", NOW, touch=False)
        assert await store.read(meta, 0, meta.tail) == b"hello"
        await store.append("kept", AppendRequest("text/plain", b"!"), NOW)
        created = await store.create(CreateRequest("new", "text/plain", Expiry(), False, b""), NOW)
        assert created.meta.stream_id > 3  # never an id that once named data
    finally:
        await store.close()
    conn = sqlite3.connect(data / "relay.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations()[-1][0]
    fresh = sqlite3.connect(":memory:")
    migrate(fresh)
    assert _schema(conn) == _schema(fresh)  # upgraded equals created new


def test_migrating_again_changes_nothing(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db", isolation_level=None)
    first = migrate(conn)
    before = _schema(conn)
    assert migrate(conn) == first
    assert _schema(conn) == before


async def test_stream_keys_lose_the_http_prefix_when_migrated(tmp_path: Path) -> None:
    """Before 008 streams were stored under their request path; now under their name (the
    path after ``/v1/stream/``), fork sources and successors included."""
    data = tmp_path / "prefixed"
    data.mkdir()
    conn = sqlite3.connect(data / "relay.sqlite3", isolation_level=None)
    for version, sql in migrations():
        if version < 8:
            conn.executescript(sql)
    conn.execute("PRAGMA user_version = 7")
    rows = (
        (1, "/v1/stream/chat/a", None, "/v1/stream/chat/b", 1),
        (2, "/v1/stream/chat/b", "/v1/stream/chat/a", None, 0),
    )
    for stream_id, path, forked_from, successor, closed in rows:
        conn.execute(
            "INSERT INTO streams (id, path, content_type, tail, closed, last_access, created_at,"
            " forked_from, successor) VALUES (?, ?, 'text/plain', 5, ?, ?, ?, ?, ?)",
            (stream_id, path, closed, NOW, NOW, forked_from, successor),
        )
    conn.close()
    store = SqliteStore(data)
    await store.open()
    try:
        closed_one = await store.head("chat/a", NOW, touch=False)
        fork = await store.head("chat/b", NOW, touch=False)
    finally:
        await store.close()
    assert (closed_one.successor, fork.forked_from) == ("chat/b", "chat/a")
