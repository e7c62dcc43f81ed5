"""The Postgres store's connections: the pool for reads, the committer's own connections, and
what losing the database looks like (Unavailable, logged once when it begins)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import structlog

from protocol.errors import Unavailable
from relay.store.postgres.connections import (
    DISCONNECTS,
    connection_lost,
    keep_session,
    pooled_options,
)

log = structlog.get_logger("relay.postgres")


class Database:
    """Connections to ``url`` (pooled work, through a pooler if any) and ``direct_url`` (a
    session of its own: LISTEN, migrations)."""

    def __init__(
        self, url: str, direct_url: str, pooler: str, timeout: float | None, pool_size: int
    ) -> None:
        self.url = url
        self.direct_url = direct_url or url
        self.pooler = pooler
        self.options = pooled_options(pooler)
        self.timeout = timeout
        self.pool_size = pool_size
        self.pool: asyncpg.Pool | None = None
        # The committer's own connections, one per batch in flight (--commit-pipeline), idle
        # ones here: no pool acquire or reset per batch.
        self.writers: list[asyncpg.Connection] = []
        self.up = True  # as last seen; outages are logged on the change only
        self.unavailable = 0  # reads answered 503; the committer counts writes
        self.statements = 0  # sent by the committer, BEGIN and COMMIT included

    async def connect_direct(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.direct_url, timeout=self.timeout or 10)

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            command_timeout=self.timeout,
            timeout=self.timeout or 10,
            reset=keep_session,
            **self.options,
        )

    async def close(self) -> None:
        for writer in self.writers:
            writer.terminate()  # idle between batches: nothing to flush
        self.writers.clear()
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), self.timeout or 10)
            except (*DISCONNECTS, asyncpg.PostgresError):
                self.pool.terminate()  # connections already lost: nothing left to flush

    def lost(self, reason: str) -> None:
        """Log an outage once, when it begins (every request during it gets 503 anyway)."""
        if self.up:
            self.up = False
            log.warning("postgres connection lost", reason=reason)

    def back(self) -> None:
        if not self.up:
            self.up = True
            log.info("postgres connection restored")

    @contextlib.asynccontextmanager
    async def conn(self) -> AsyncIterator[Any]:
        """A pooled connection; losing the database becomes Unavailable (503).

        The wait for a connection and the work on it share one ``--db-timeout``: with a
        frozen link, a wait then a query each taking the whole timeout answered in twice it.
        """
        pool = self.pool
        assert pool is not None
        timeout = self.timeout
        try:
            if timeout is None:
                async with pool.acquire() as conn:
                    yield conn
                return
            deadline = asyncio.get_running_loop().time() + timeout
            conn = await pool.acquire(timeout=timeout)
            try:
                async with asyncio.timeout_at(deadline):
                    yield conn
            except TimeoutError:
                conn.terminate()  # a query cut short on a link that may be frozen: not reusable
                raise
            finally:
                await pool.release(conn, timeout=timeout)
        except DISCONNECTS as exc:
            if not connection_lost(exc):
                raise
            self.unavailable += 1
            self.lost(type(exc).__name__)
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from None

    async def writer(self) -> asyncpg.Connection:
        """An idle connection of the committer's own, or a new one: no pool acquire or reset
        per batch, and nothing after COMMIT that could fail and turn a committed batch into
        an error. The batch hands it back with :meth:`writer_done`."""
        while self.writers:
            conn = self.writers.pop()
            if not conn.is_closed():
                return conn
        try:
            conn = await asyncpg.connect(
                self.url,
                timeout=self.timeout or 10,
                command_timeout=self.timeout,
                **self.options,
            )
        except Exception as exc:  # refused, shutting down, timed out, TLS: all unreachable
            self.lost(type(exc).__name__)
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
        conn.add_query_logger(self._count_statement)
        return conn

    def writer_done(self, conn: asyncpg.Connection) -> None:
        if not conn.is_closed():
            self.writers.append(conn)

    def writer_failed(self, conn: asyncpg.Connection, exc: BaseException) -> None:
        """After a failed statement on a committer's connection: a connection that is gone
        means the database is (Unavailable); cancellation and the like propagate; anything
        else is the caller's to handle (the statement, or its transaction, rolled back)."""
        lost = connection_lost(exc) or conn.is_closed()
        if lost or not isinstance(exc, Exception):
            conn.terminate()  # so it is not handed back
        if lost:
            self.lost(type(exc).__name__)
            raise Unavailable(f"database unavailable: {type(exc).__name__}") from None
        if not isinstance(exc, Exception):
            raise exc

    def _count_statement(self, _query: object) -> None:
        self.statements += 1

    def in_use(self) -> tuple[int, int]:
        """(connections in use, pool size)."""
        pool = self.pool
        if pool is None:
            return 0, 0
        return pool.get_size() - pool.get_idle_size(), pool.get_size()
