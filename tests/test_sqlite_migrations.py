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
