"""Chat metadata in a real database: chats, their messages, and which Relay stream holds each
reply. SQLite (stdlib ``sqlite3``) by default, Postgres (``asyncpg``) when given a URL.

The statements are written once, in Postgres' ``$n`` style; SQLite takes the same text with
``?n`` placeholders. The tables are prefixed ``chat_`` so they can share a database with Relay's
``relay_*`` tables. On Postgres, Relay follows these tables (``TABLE_STREAMS``): each committed
transaction becomes one append to the chat's state stream, so one send is one transaction.

``python -m examples.chat.backend.metadata`` creates the tables in ``CHAT_DATABASE_URL`` and
prints the relay's ``--table-stream`` definitions, one a line (``examples/chat/run`` does this
before it starts a relay, which refuses a table stream whose table does not exist yet).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS chat_chats (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chat_messages (
        id TEXT PRIMARY KEY,
        chat_id TEXT NOT NULL REFERENCES chat_chats (id),
        position INTEGER NOT NULL,
        role TEXT NOT NULL,
        text TEXT NOT NULL,
        status TEXT NOT NULL,
        stream TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        UNIQUE (chat_id, position))""",
)
POSTGRES_SCHEMA = (
    *SCHEMA,
    # A delete must carry chat_id (the state stream's path) as well as the key.
    "ALTER TABLE chat_messages REPLICA IDENTITY FULL",
)
TABLE_STREAMS = (
    "chat_chats:chat/{id}/state:type=chat:key=id:columns=id,title,created_at",
    "chat_messages:chat/{chat_id}/state:type=message:key=id"
    ":columns=id,chat_id,position,role,text,status,stream,created_at",
)
"""Relay's ``--table-stream`` definitions: the rows (every column the page reads) as the State
Protocol changes ``state.change`` publishes on SQLite, to the same ``chat/<id>/state`` stream."""
TXID = "SELECT pg_current_xact_id()::xid::text"
"""The transaction's id as table streams send it in ``headers.txid`` (pgoutput's 32-bit xid)."""
INSERT_CHAT = "INSERT INTO chat_chats (id, title, created_at) VALUES ($1, $2, $3)"
SELECT_CHAT = "SELECT id, title, created_at FROM chat_chats WHERE id = $1"
UPDATE_TITLE = "UPDATE chat_chats SET title = $2 WHERE id = $1"
LOCK_CHAT = "SELECT 1 FROM chat_chats WHERE id = $1 FOR UPDATE"
NEXT_POSITION = "SELECT COALESCE(MAX(position), -1) + 1 FROM chat_messages WHERE chat_id = $1"
INSERT_MESSAGE = """INSERT INTO chat_messages
    (id, chat_id, position, role, text, status, stream, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"""
FINISH_MESSAGE = "UPDATE chat_messages SET text = $2, status = $3 WHERE id = $1"
MESSAGE_COLUMNS = "id, chat_id, position, role, text, status, stream, created_at"
SELECT_MESSAGE = f"SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE id = $1"
SELECT_MESSAGES = (
    f"SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE chat_id = $1 ORDER BY position"
)
SELECT_UNFINISHED = f"""SELECT {MESSAGE_COLUMNS} FROM chat_messages
    WHERE status = 'streaming' ORDER BY created_at, id"""


@dataclass(frozen=True, slots=True)
class Chat:
    id: str
    title: str
    created_at: float

    def value(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Message:
    """A user message, or an assistant reply whose tokens live in the Relay stream ``stream``
    (its ``text`` is filled in once the reply is complete)."""

    id: str
    chat_id: str
    position: int
    role: str
    text: str
    status: str  # "streaming", "done" or "error"
    stream: str | None
    created_at: float

    def value(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Written:
    """What one send wrote, in one transaction."""

    user: Message
    reply: Message
    chat: Chat | None  # the chat with its new title, when this was its first message
    txid: str | None  # Postgres: the transaction, as the table stream's ``headers.txid``


class MetadataStore(ABC):
    """The chat operations, written once over two small driver primitives."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and create the tables if they are missing."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    async def _insert_turn(
        self, chat_id: str, rows: Sequence[tuple[Any, ...]], title: str
    ) -> tuple[int, str | None]:
        """Insert message rows (without position) at the chat's next positions, and ``title``
        when they are the chat's first, in one transaction; returns the first position used
        and the transaction's id (Postgres)."""

    async def create_chat(self, chat: Chat) -> None:
        await self._fetch(INSERT_CHAT, chat.id, chat.title, chat.created_at)

    async def chat(self, chat_id: str) -> Chat | None:
        rows = await self._fetch(SELECT_CHAT, chat_id)
        return Chat(*rows[0]) if rows else None

    async def add_turn(self, chat: Chat, user: Message, assistant: Message, title: str) -> Written:
        """Store a user message and the reply that answers it (which names its stream),
        positioned after the chat's last message, and the chat's title if this is its first
        message: one transaction."""
        rows = [
            (m.id, m.chat_id, m.role, m.text, m.status, m.stream, m.created_at)
            for m in (user, assistant)
        ]
        first, txid = await self._insert_turn(chat.id, rows, title)
        return Written(
            Message(**{**user.value(), "position": first}),
            Message(**{**assistant.value(), "position": first + 1}),
            Chat(chat.id, title, chat.created_at) if first == 0 else None,
            txid,
        )

    async def finish(self, message_id: str, text: str, status: str) -> Message:
        await self._fetch(FINISH_MESSAGE, message_id, text, status)
        return Message(*(await self._fetch(SELECT_MESSAGE, message_id))[0])

    async def messages(self, chat_id: str) -> list[Message]:
        return [Message(*row) for row in await self._fetch(SELECT_MESSAGES, chat_id)]

    async def unfinished(self) -> list[Message]:
        """Replies still ``streaming``: a backend that stopped mid-reply resumes them."""
        return [Message(*row) for row in await self._fetch(SELECT_UNFINISHED)]


def _positioned(row: tuple[Any, ...], position: int) -> tuple[Any, ...]:
    return (row[0], row[1], position, *row[2:])


class SqliteStore(MetadataStore):
    """One connection used from worker threads, one statement at a time: the example's
    writes are a few per message, far below what SQLite does without contention."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        for statement in SCHEMA:
            conn.execute(statement)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._run, [(sql, args)])

    async def _insert_turn(
        self, chat_id: str, rows: Sequence[tuple[Any, ...]], title: str
    ) -> tuple[int, str | None]:
        return await asyncio.to_thread(self._turn, chat_id, rows, title), None

    def _run(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        with self._lock:
            out: list[tuple[Any, ...]] = []
            for sql, args in statements:
                out = self._conn.execute(sql.replace("$", "?"), args).fetchall()
            return out

    def _turn(self, chat_id: str, rows: Sequence[tuple[Any, ...]], title: str) -> int:
        assert self._conn is not None
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                first: int = conn.execute(NEXT_POSITION.replace("$", "?"), (chat_id,)).fetchone()[0]
                for n, row in enumerate(rows):
                    conn.execute(INSERT_MESSAGE.replace("$", "?"), _positioned(row, first + n))
                if first == 0:
                    conn.execute(UPDATE_TITLE.replace("$", "?"), (chat_id, title))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return first


class PostgresStore(MetadataStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=4)
        async with self._pool.acquire() as conn:
            await create_tables(conn)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        assert self._pool is not None
        return [tuple(r) for r in await self._pool.fetch(sql, *args)]

    async def _insert_turn(
        self, chat_id: str, rows: Sequence[tuple[Any, ...]], title: str
    ) -> tuple[int, str | None]:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            # Serialises turns of one chat, so two sends cannot take the same position.
            await conn.execute(LOCK_CHAT, chat_id)
            first: int = await conn.fetchval(NEXT_POSITION, chat_id)
            for n, row in enumerate(rows):
                await conn.execute(INSERT_MESSAGE, *_positioned(row, first + n))
            if first == 0:
                await conn.execute(UPDATE_TITLE, chat_id, title)
            txid: str = await conn.fetchval(TXID)
            return first, txid


async def create_tables(conn: asyncpg.Connection) -> None:
    """The tables, created once: concurrent starts (relay set-up, backend) may race."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('chat_tables'))")
        for statement in POSTGRES_SCHEMA:
            await conn.execute(statement)


def open_store(database_url: str, sqlite_path: Path) -> MetadataStore:
    """Postgres when a URL is given, else SQLite at ``sqlite_path``."""
    return PostgresStore(database_url) if database_url else SqliteStore(sqlite_path)


async def _create(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await create_tables(conn)
    finally:
        await conn.close()


def main() -> int:
    url = os.environ.get("CHAT_DATABASE_URL", "")
    if not url:
        print("metadata: set CHAT_DATABASE_URL to the Postgres database", file=sys.stderr)
        return 2
    asyncio.run(_create(url))
    print("\n".join(TABLE_STREAMS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
