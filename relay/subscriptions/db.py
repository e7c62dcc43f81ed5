"""One small async SQL interface over both backends, so subscription state is written once.

Statements use ``?`` placeholders and ``{streams}`` for the stream table; the Postgres side
numbers the placeholders and adds row locks (``{lock}``, ``{skip_locked}``), which SQLite
does not need: there a transaction (``BEGIN IMMEDIATE``) already excludes every other writer.
Driver errors that mean "the database is gone" become ``Unavailable`` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from protocol.errors import Unavailable
from relay.store.postgres.connections import pooled_options

Row = Sequence[Any]


class Contention(Unavailable):
    """Another relay's transaction got in the way (unique violation, deadlock,
    serialization failure): nothing was written; safe to try again (503 with Retry-After)."""

    def __init__(self) -> None:
        super().__init__("concurrent subscription change; retry", retry_after=1)


class Tx(Protocol):
    """One open transaction."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def execute(self, sql: str, *args: Any) -> None: ...


class Database(Protocol):
    """Where subscription state lives; ``transaction`` retries nothing, callers decide."""

    backend: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def transaction(self, *, write: bool = True) -> contextlib.AbstractAsyncContextManager[Tx]:
        """``write=False`` promises only reads (SQLite then takes no write lock)."""
        ...


_PLACEHOLDER = re.compile(r"\?")


def render(sql: str, backend: str) -> str:
    """A statement for one backend: table names, lock clauses and placeholders."""
    if backend == "postgres":
        sql = sql.format(
            streams="relay_streams", lock="FOR UPDATE", skip_locked="FOR UPDATE SKIP LOCKED"
        )
        counter = iter(range(1, 10_000))
        return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)
    return sql.format(streams="streams", lock="", skip_locked="")


class _SqliteTx:
    def __init__(self, db: SqliteDatabase) -> None:
        self._db = db

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        rows: list[Row] = await self._db.run(_fetch, render(sql, "sqlite"), args)
        return rows

    async def execute(self, sql: str, *args: Any) -> None:
        await self._db.run(_fetch, render(sql, "sqlite"), args)


def _fetch(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[Row]:
    rows: list[Row] = list(conn.execute(sql, args).fetchall())
    return rows


class SqliteDatabase:
    """A second connection to the embedded store's file, on its own thread.

    The stream store's writer and this connection take turns through SQLite's write lock
    (``busy_timeout``); one relay owns a data directory, so nothing else competes.
    """

    backend = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="relay-subscriptions")
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA synchronous=FULL")
            return conn

        self._conn = await asyncio.get_running_loop().run_in_executor(self._thread, connect)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._thread, conn.close)
        self._thread.shutdown(wait=False)

    async def run(self, fn: Any, *args: Any) -> Any:
        assert self._conn is not None, "database not open"
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, fn, self._conn, *args
            )
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"embedded store busy: {exc}") from exc

    @contextlib.asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Tx]:
        async with self._lock:
            try:
                # Inside the try: a cancel while BEGIN waits for the thread does not stop the
                # BEGIN, which would leave the connection in a transaction for good; the
                # ROLLBACK queues behind it on the same thread.
                await self.run(_fetch, "BEGIN IMMEDIATE" if write else "BEGIN", ())
                yield _SqliteTx(self)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.run(_fetch, "ROLLBACK", ()))
                raise
            await asyncio.shield(self.run(_fetch, "COMMIT", ()))


class _PgTx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(render(sql, "postgres"), *args))

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(render(sql, "postgres"), *args)


_LOST = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)


_CONTENTION = (
    asyncpg.UniqueViolationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


class PostgresDatabase:
    """A small pool of its own, beside the stream store's (which its committer owns)."""

    backend = "postgres"

    def __init__(self, url: str, timeout: float, *, pooler: str = "none") -> None:
        self._url = url
        self._timeout = timeout or None
        self._pooler = pooler  # each transaction stands alone: a pooler may sit in between
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=1,
            max_size=4,
            command_timeout=self._timeout,
            **pooled_options(self._pooler),
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except (TimeoutError, *_LOST):
                pool.terminate()

    @contextlib.asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Tx]:
        assert self._pool is not None, "database not open"
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
                yield _PgTx(conn)
        except _CONTENTION as exc:
            raise Contention() from exc
        except _LOST as exc:
            raise Unavailable("database unavailable") from exc
