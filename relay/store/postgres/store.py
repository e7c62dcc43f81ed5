"""The Postgres store: the engine's plans on asyncpg, group commit, LISTEN/NOTIFY across
relays, compaction.

Writes go through the engine's committer (:mod:`relay.store.engine`). A batch of appends to
streams this relay wrote last is planned against what it knows and goes as one guarded
statement (:mod:`~relay.store.postgres.guarded`); any other batch runs in a transaction that
locks what it touches and answers the plans' needs (:mod:`~relay.store.postgres.transaction`),
ending in one statement that writes every staged row and sends one ``NOTIFY`` listing the
streams that moved. Each relay LISTENs on one connection (:mod:`~relay.store.postgres.listen`)
and tells its listener (the commit sink); the same notifications keep ``Known`` exact, so reads
answer from it. This class composes those parts with the pool (:mod:`~relay.store.postgres.
database`), read replicas and compaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import asyncpg
import structlog

from protocol.errors import StorageFull, Unavailable
from protocol.lifecycle import is_expired
from protocol.model import StreamMeta
from relay.store.base import StoreStartupError, StoreStats
from relay.store.batching import Touches, WriteOp
from relay.store.common import row_meta
from relay.store.engine.engine import Engine, run_batch_async
from relay.store.engine.plan import Batch
from relay.store.postgres.compaction import COMPACT_PASS_BYTES, CompactionPass, Compactor
from relay.store.postgres.connections import DISCONNECTS, RETRYABLE
from relay.store.postgres.database import Database
from relay.store.postgres.guarded import Divergence, plan_guarded
from relay.store.postgres.known import Known, Owned, OwnedStreams
from relay.store.postgres.listen import Listener
from relay.store.postgres.notify import notify_payload
from relay.store.postgres.replicas import ReplicaReader
from relay.store.postgres.schema import apply_migrations, migrations
from relay.store.postgres.transaction import PgTransaction, Q, read_range, with_segments

log = structlog.get_logger("relay.postgres")

RETRIES = 3


class PostgresStore(Engine):
    """Streams in Postgres (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        max_batch_ops: int = 1024,
        max_batch_bytes: int = 16 * 1024 * 1024,
        commit_interval: float = 0.0,
        max_fork_scan: int = 16 * 1024 * 1024,
        command_timeout: float = 5.0,
        compact_idle_seconds: float = 10.0,
        compact_interval: float = 2.0,
        pool_size: int = 8,
        clock: Callable[[], float] = time.time,
        direct_url: str = "",
        pooler: str = "none",
        read_urls: Sequence[str] = (),
        commit_pipeline: int = 1,
    ) -> None:
        super().__init__(
            max_batch_ops=max_batch_ops,
            max_batch_bytes=max_batch_bytes,
            commit_interval=commit_interval,
            max_fork_scan=max_fork_scan,
            commit_pipeline=commit_pipeline,
        )
        timeout = command_timeout or None
        self._db = Database(url, direct_url, pooler, timeout, pool_size)
        self._replicas = (
            ReplicaReader(
                read_urls,
                command_timeout=timeout,
                pool_size=pool_size,
                options=self._db.options,  # standbys may sit behind the same kind of pooler
            )
            if read_urls
            else None
        )
        self._origin = uuid.uuid4().hex[:12]
        self._known = Known()
        self._owned = OwnedStreams()
        self._divergence = Divergence(self._owned, self._known)
        self._listener = Listener(
            self._db, self._known, self._owned, self._origin, self._replicas, lambda: self._events
        )
        self._compactor = Compactor(self._db.conn, clock, compact_idle_seconds, compact_interval)
        self._tasks: list[asyncio.Task[None]] = []
        self._stats = dict.fromkeys(
            ("appends", "rows_written", "guarded_writes", "guard_misses"), 0
        )
        # Callers waiting for the next lookup of a path; see _shared_load.
        self._lookups: dict[str, list[asyncio.Future[StreamMeta | None]]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL (subscription state shares the database, on its own pool)."""
        return self._db.url

    @property
    def pooler(self) -> str:
        """What ``url`` reaches: ``none`` (Postgres) or ``transaction`` (a pooler)."""
        return self._db.pooler

    @property
    def _listening(self) -> bool:
        return self._listener.listening

    @property
    def _writers(self) -> list[asyncpg.Connection]:
        return self._db.writers

    async def open(self) -> None:
        try:
            conn = await self._db.connect_direct()
        except (*DISCONNECTS, asyncpg.PostgresError) as exc:
            raise StoreStartupError(f"cannot reach Postgres: {exc}") from None
        try:
            await apply_migrations(conn)
            if self._replicas is not None:
                await self._replicas.open(conn)
        finally:
            await conn.close()
        await self._db.open()
        self._committer.start()
        self._tasks = [
            asyncio.create_task(self._listener.run_forever(), name="pg-listen"),
            asyncio.create_task(self._compactor.run_forever(), name="pg-compact"),
        ]

    async def close(self) -> None:
        await self._committer.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._db.close()
        if self._replicas is not None:
            await self._replicas.close()

    def stats(self) -> StoreStats:
        base = self._committer.stats()
        counts = self._stats
        replicas = self._replicas
        in_use, size = self._db.in_use()
        return replace(
            base,
            replica_reads=replicas.reads if replicas else None,
            replica_fallbacks=replicas.fallbacks if replicas else None,
            replica_errors=replicas.errors if replicas else None,
            replicas_up=replicas.up if replicas else None,
            appends=counts["appends"],
            rows_written=counts["rows_written"],
            unavailable=base.unavailable + self._db.unavailable,
            rows_compacted=self._compactor.rows,
            bytes_compacted=self._compactor.bytes,
            compaction_passes=self._compactor.passes,
            listen_reconnects=self._listener.reconnects,
            statements=self._db.statements,
            guarded_writes=counts["guarded_writes"],
            guard_misses=counts["guard_misses"],
            diverged_streams=self._divergence.count,
            pool_in_use=in_use,
            pool_size=size,
        )

    async def ready(self) -> str | None:
        """Ready when a pooled connection answers and the schema is at this relay's version."""
        if self._db.pool is None:
            return "store is not open"
        fault = self._committer.write_fault()
        if fault is not None:
            return fault
        try:
            async with self._db.conn() as conn:
                version = await conn.fetchval(Q["schema_version"])
        except Unavailable as exc:
            return str(exc)
        except asyncpg.PostgresError as exc:
            return f"database error: {type(exc).__name__}"
        wanted = migrations()[-1][0]
        if version < wanted:
            return f"schema at version {version}, this relay needs {wanted}"
        return None

    async def compact(self, now: float, *, budget: int = COMPACT_PASS_BYTES) -> CompactionPass:
        """One compaction pass (``compaction.compact_pass``), counted in the store's stats."""
        return await self._compactor.compact(now, budget=budget)

    # -- reads -------------------------------------------------------------------------------

    async def _lookup(self, path: str, now: float) -> StreamMeta | None:
        try:
            # The barrier and the lookup share one --db-timeout: a frozen link cost both.
            async with asyncio.timeout(self._db.timeout):
                meta = await self._known_fresh(path, now)
                return meta if meta is not None else await self._shared_load(path)
        except TimeoutError:
            self._db.unavailable += 1
            self._db.lost("TimeoutError")
            raise Unavailable("database unavailable: TimeoutError") from None

    def tracked(self, path: str, position: int, now: float) -> StreamMeta | None:
        """The stream for a live reader parking at ``position``, without a database round trip.

        Only when this relay's view says ``position`` is the tail of an open stream without a
        TTL: a commit it has not seen yet (another relay's, its NOTIFY in flight) wakes the
        parked reader, so nothing is missed. Anything else goes to the database.
        """
        if not self._listener.listening:
            return None
        meta = self._known.by_path.get(path)
        if (
            meta is None
            or meta.tail != position
            or meta.closed
            or meta.soft_deleted
            or meta.ttl is not None
            or is_expired(meta, now)
        ):
            return None
        return meta

    async def _known_fresh(self, path: str, now: float) -> StreamMeta | None:
        """The stream as this relay knows it, once every commit acknowledged before this call
        (by any relay) has reached ``_known``; None when the database must answer.

        Any relay's commit NOTIFYs before it is acknowledged, and Postgres sends a listening
        session the notifications committed before a query ahead of that query's answer, so
        after one round trip on the LISTEN connection (``Listener.notified``, shared by every
        caller waiting for it) ``_known`` is as fresh as a query would be. What a NOTIFY
        does not carry stays with the database: a closed stream (its close may have named a
        successor), a soft-deleted one (it may be purged and its path re-created) and a TTL
        stream that looks expired (other relays' reads extend it).
        """
        if not self._listener.listening or path not in self._known.by_path:
            return None
        if not await self._listener.notified():
            return None
        meta = self._known.by_path.get(path)
        if meta is None or meta.closed or meta.soft_deleted:
            return None
        if meta.ttl is not None and is_expired(meta, now):
            return None
        return meta

    async def _shared_load(self, path: str) -> StreamMeta | None:
        """Load a stream's row, one query serving every caller that asked before it began.

        When a commit wakes hundreds of parked readers they all ask for the same row at once.
        Callers queue per path; a loader runs one query for everyone queued, then another for
        whoever arrived meanwhile. Each query starts after its callers arrived, so a read
        never misses a write acknowledged before it (on this relay or any other).
        """
        waiter: asyncio.Future[StreamMeta | None] = asyncio.get_running_loop().create_future()
        queued = self._lookups.get(path)
        if queued is None:
            self._lookups[path] = [waiter]
            self._listener.spawn(self._run_lookups(path))
        else:
            queued.append(waiter)
        return await waiter

    async def _run_lookups(self, path: str) -> None:
        try:
            while batch := self._lookups[path]:
                self._lookups[path] = []
                try:
                    listening = self._listener.listening
                    since = self._known.mark()  # what the row may predate (Known.put)
                    meta = await self._load_pooled(path)
                    if meta is not None and listening and self._listener.listening:
                        self._known.put(meta, since)
                except Exception as exc:
                    for waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(exc)
                else:
                    for waiter in batch:
                        if not waiter.done():
                            waiter.set_result(meta)
        finally:
            del self._lookups[path]

    async def _load_pooled(self, path: str) -> StreamMeta | None:
        async with self._db.conn() as conn:
            row = await conn.fetchrow(Q["load_stream"], path)
            return await with_segments(conn, row_meta(row)) if row else None

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes:
        """From a read replica holding all of ``[start, end)`` if there is one (never for a
        stream the database lost appends of: a replica may hold bytes the primary lost), else
        the primary."""
        if start >= end:
            return b""
        replicas = self._replicas
        if replicas is not None and meta.stream_id not in self._divergence.diverged:
            data = await replicas.read(meta, start, end)
            if data is not None:
                return data
        async with self._db.conn() as conn:
            return await read_range(conn, meta, start, end)

    async def inheriting(self, path: str, offset: int) -> list[str]:
        async with self._db.conn() as conn:
            stream_id = await conn.fetchval(Q["stream_id"], path)
            if stream_id is None:
                return []
            return [row[1] for row in await conn.fetch(Q["inheriting"], stream_id, offset)]

    # -- the batch ---------------------------------------------------------------------------

    async def _apply(self, batch: list[WriteOp], touches: Touches) -> list[Any]:
        conn = await self._db.writer()
        since = self._known.mark()  # notifications heard from here merge into its result
        try:
            guarded = plan_guarded(batch, touches, self._owned, self._divergence.diverged)
            if guarded is not None:
                outcomes = await self._write_guarded(conn, *guarded, since)
                if outcomes is not None:
                    return outcomes
            return await self._locked(conn, batch, touches, since)
        except asyncpg.exceptions.DiskFullError as exc:  # SQLSTATE 53100: rolled back
            raise StorageFull(f"the database has no space left: {exc}") from None
        except asyncpg.exceptions.InsufficientResourcesError as exc:  # the rest of class 53
            raise Unavailable(f"the database is out of resources ({exc.sqlstate})") from None
        finally:
            self._db.writer_done(conn)  # unless it was lost or terminated on the way

    async def _write_guarded(
        self,
        conn: asyncpg.Connection,
        batch: Batch,
        outcomes: list[Any],
        expected: dict[int, int],
        since: int,
    ) -> list[Any] | None:
        """The batch as one guarded statement; None if a stream changed underneath (then
        nothing of it was written and the caller takes the locking path)."""
        transaction = PgTransaction(conn, batch, self._divergence)
        try:
            await transaction.write(notify_payload(self._origin, batch), expected=expected)
        except BaseException as exc:
            # RL001 (a tail moved), a chunk another relay wrote at the same offset, a deadlock
            # with it, or anything else the statement refused: it all rolled back together.
            # The locking re-run replaces what this relay knew (and compares it first: a
            # database behind it means lost appends, see ``Divergence``).
            self._db.writer_failed(conn, exc)
            self._stats["guard_misses"] += 1
            sqlstate = getattr(exc, "sqlstate", None)
            log.debug("guarded write refused, locking", error=type(exc).__name__, sqlstate=sqlstate)
            return None
        self._stats["guarded_writes"] += 1
        self._committed(batch, since)
        return outcomes

    async def _locked(
        self, conn: asyncpg.Connection, ops: list[WriteOp], touches: Touches, since: int
    ) -> list[Any]:
        for attempt in range(RETRIES):
            transaction = PgTransaction(
                conn, Batch(diverged=self._divergence.diverged), self._divergence
            )
            try:
                async with conn.transaction():
                    await self._lock(transaction, ops, touches)
                    outcomes = await run_batch_async(transaction.batch, ops, transaction.answer)
                    batch = transaction.batch
                    changed = batch.moved or batch.removed or batch.retained
                    await transaction.write(
                        notify_payload(self._origin, batch) if changed else None
                    )
            except RETRYABLE:
                if attempt == RETRIES - 1:
                    raise Unavailable("database contention, retry") from None
                await asyncio.sleep(0.01 * (attempt + 1))
                continue
            except BaseException as exc:
                self._db.writer_failed(conn, exc)
                log.warning("batch transaction failed", error=type(exc).__name__)
                raise
            # Committed: from here on the outcomes stand, whatever else happens.
            self._committed(batch, since)
            return outcomes
        raise AssertionError("unreachable")

    async def _lock(self, transaction: PgTransaction, ops: list[WriteOp], touches: Touches) -> None:
        """The locking transaction's opening statements (``PgTransaction.lock``)."""
        await transaction.lock(ops, touches)

    def _committed(self, batch: Batch, since: int) -> None:
        """After COMMIT: what this relay now knows exactly, and who hears of removals.
        (Another relay's commit may have been heard since the batch began: ``Known.put``
        keeps the later tail.)"""
        self._db.back()
        self._divergence.committed(batch)
        self._stats["rows_written"] += batch.written
        self._stats["appends"] += batch.appends
        for meta in batch.metas.values():
            self._known.put(meta, since)
            self._own(batch, meta)
        for stream_id in batch.removed:
            self._known.removed(stream_id)
            self._owned.drop(stream_id)
            if self._events is not None:
                self._events.deleted(stream_id)

    def _own(self, batch: Batch, meta: StreamMeta) -> None:
        """Remember a stream this batch locked or wrote, with the producer states it knows:
        those it read or wrote now, plus what it knew before if nobody wrote in between."""
        sid = meta.stream_id
        producers = {pid: st for (stream, pid), st in batch.producers.items() if stream == sid}
        before = self._owned.by_path.get(meta.path)
        locked = batch.locked.get(sid)
        complete = sid in batch.created
        if before is not None and before.meta.stream_id == sid:
            unchanged = locked is None or locked == (before.meta.tail, before.meta.closed)
            if unchanged:
                producers = {**before.producers, **producers}
                complete = complete or before.complete
        self._owned.put(Owned(meta, producers, complete))
