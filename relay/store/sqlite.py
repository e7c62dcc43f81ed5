"""The embedded store: SQLite in WAL mode with group commit.

One writer thread owns the write connection. Requests queue operations; the committer takes
everything queued, runs their plans (:mod:`relay.store.engine.plan`) in one transaction on that
thread, answering each plan's needs with the named statements of ``sql/sqlite/queries.sql``
(:class:`SqliteTransaction`), commits with ``synchronous=FULL`` (the WAL is fsynced), and only
then resolves each request. While one batch commits, the next fills. Readers use their own
connections in a small thread pool; WAL lets them run beside the writer.

Once a stream has been idle for ``compact_idle_seconds``, a compaction pass on the writer
thread merges its rows (:mod:`relay.store.compaction`), one stream a transaction, between
batches.

Stream metadata is cached in memory. Only the writer thread changes the cache (after each
commit, and when loading a missing entry between commits), so a cached entry always equals
committed state and request paths that only need metadata never touch the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import structlog

from protocol.errors import StorageFull
from protocol.model import ProducerState, StreamMeta, fork_segments
from relay.store.base import StoreEvents, StoreStartupError, StoreStats
from relay.store.batching import Touches, WriteOp
from relay.store.common import (
    decode_acks,
    encode_acks,
    named_queries,
    numbered_sql,
    row_meta,
    segment_ranges,
    stitch,
)
from relay.store.compaction import (
    COMPACT_BYTES,
    COMPACT_CANDIDATES,
    COMPACT_IDLE_SECONDS,
    COMPACT_INTERVAL,
    COMPACT_PASS_BYTES,
    CompactionPass,
    merges,
)
from relay.store.engine import needs
from relay.store.engine.engine import Engine, run_batch, with_access
from relay.store.engine.plan import Batch

Q = named_queries("sqlite")
log = structlog.get_logger("relay.sqlite")
CACHE_LIMIT = 100_000
"""Stream metadata entries held (about 1 KiB each with their segments); full, it starts over."""


def migrations() -> list[tuple[int, str]]:
    """``sql/sqlite/NNN_name.sql`` in order; the applied version is ``PRAGMA user_version``."""
    return numbered_sql("sqlite")


def migrate(conn: sqlite3.Connection) -> int:
    """Bring a data directory's schema to the newest version, one transaction per step."""
    current: int = conn.execute("PRAGMA user_version").fetchone()[0]
    for version, sql in migrations():
        if version <= current:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version:d}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        current = version
    return current


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    out, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            out.append(buffer.strip())
            buffer = ""
    return out


class SqliteStore(Engine):
    """The embedded, durable default store (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        max_batch_ops: int = 1024,
        max_batch_bytes: int = 16 * 1024 * 1024,
        commit_interval: float = 0.0,
        max_fork_scan: int = 16 * 1024 * 1024,
        compact_idle_seconds: float = COMPACT_IDLE_SECONDS,
        compact_interval: float = COMPACT_INTERVAL,
        clock: Callable[[], float] = time.time,
        cache_limit: int = CACHE_LIMIT,
    ) -> None:
        super().__init__(max_batch_ops, max_batch_bytes, commit_interval, max_fork_scan)
        self._compact_idle = compact_idle_seconds
        self._compact_interval = compact_interval
        self._clock = clock
        self._compacting: asyncio.Task[None] | None = None
        self._dir = Path(data_dir)
        self._db_path = self._dir / "relay.sqlite3"
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="relay-sqlite-writer")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="relay-sqlite-reader")
        self._local = threading.local()
        self._write_conn: sqlite3.Connection | None = None
        self._cache: dict[str, StreamMeta] = {}
        self._cache_limit = cache_limit
        self._lock_file: IO[str] | None = None
        self._stats = {"appends": 0, "rows_written": 0, "rows": 0, "bytes": 0, "passes": 0}

    @property
    def db_path(self) -> Path:
        """The database file (subscription state shares it, on its own connection)."""
        return self._db_path

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock_directory()
        loop = asyncio.get_running_loop()
        try:
            self._write_conn = await loop.run_in_executor(self._writer, self._connect_writer)
        except sqlite3.Error as exc:  # not a database, a newer schema, a disk I/O error
            raise StoreStartupError(f"cannot open {self._db_path}: {exc}") from None
        self._committer.start()
        self._compacting = asyncio.create_task(self._compact_forever(), name="sqlite-compact")

    def _lock_directory(self) -> None:
        """One process per data directory: the metadata cache assumes it is the only writer."""
        self._lock_file = open(self._dir / "relay.lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise StoreStartupError(f"another relay is using {self._dir}") from None

    def _connect_writer(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA secure_delete=ON")  # deleted rows are zeroed, not just unlinked
        migrate(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
        return conn

    async def close(self) -> None:
        if self._compacting is not None:
            self._compacting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compacting
        await self._committer.stop()
        loop = asyncio.get_running_loop()
        if self._write_conn is not None:
            await loop.run_in_executor(self._writer, self._write_conn.close)
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self._lock_file is not None:
            self._lock_file.close()

    def set_listener(self, events: StoreEvents) -> None:
        """Hears commits and removals; one process owns the data directory, so no remote
        commits."""
        super().set_listener(events)

    def stats(self) -> StoreStats:
        return replace(
            self._committer.stats(),
            appends=self._stats["appends"],
            rows_written=self._stats["rows_written"],
            rows_compacted=self._stats["rows"],
            bytes_compacted=self._stats["bytes"],
            compaction_passes=self._stats["passes"],
        )

    async def ready(self) -> str | None:
        """Ready once open, readable, and at the schema version this relay migrates to."""
        if self._write_conn is None:
            return "store is not open"
        fault = self._committer.write_fault()
        if fault is not None:
            return fault
        loop = asyncio.get_running_loop()
        try:
            version = await loop.run_in_executor(self._readers, self._schema_version)
        except (sqlite3.Error, RuntimeError) as exc:  # RuntimeError: the pool is shut down
            return f"database unreadable: {type(exc).__name__}"
        wanted = migrations()[-1][0]
        if version < wanted:
            return f"schema at version {version}, this relay needs {wanted}"
        return None

    def _schema_version(self) -> int:
        version: int = self._reader().execute("PRAGMA user_version").fetchone()[0]
        return version

    # -- reads -------------------------------------------------------------------------------

    async def _lookup(self, path: str, now: float) -> StreamMeta | None:
        meta = self._cache.get(path)
        if meta is None:
            loop = asyncio.get_running_loop()
            meta = await loop.run_in_executor(self._writer, self._load_into_cache, path)
        return meta

    def _load_into_cache(self, path: str) -> StreamMeta | None:
        """Writer thread, between commits: what it loads is committed and stays current."""
        assert self._write_conn is not None
        meta = load(self._write_conn, path)
        if meta is not None:
            if len(self._cache) >= self._cache_limit:
                self._cache.clear()
            self._cache[path] = meta
        return meta

    def tracked(self, path: str, position: int, now: float) -> StreamMeta | None:
        """None: ``head`` already answers from the in-memory cache, kept by the only writer."""
        return None

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._readers, lambda: read_range(self._reader(), meta, start, end)
        )

    async def inheriting(self, path: str, offset: int) -> list[str]:
        def query() -> list[str]:
            conn = self._reader()
            row = conn.execute(Q["stream_id"], (path,)).fetchone()
            if row is None:
                return []
            return [r[1] for r in conn.execute(Q["inheriting"], (row[0], offset)).fetchall()]

        return await asyncio.get_running_loop().run_in_executor(self._readers, query)

    # -- compaction --------------------------------------------------------------------------

    async def _compact_forever(self) -> None:
        while True:
            await asyncio.sleep(self._compact_interval)
            try:
                await self.compact(self._clock())
            except (sqlite3.Error, OSError):
                log.exception("compaction failed")

    async def compact(self, now: float, *, budget: int = COMPACT_PASS_BYTES) -> CompactionPass:
        """One pass: merge the rows of streams idle since ``now - compact_idle_seconds``, the
        longest idle first, reading at most ``budget`` bytes (at least one run), in
        transactions of up to COMPACT_BYTES read on the writer thread: batches commit between
        them, and a hundred streams of two rows share one fsync."""
        loop = asyncio.get_running_loop()
        idle_since = now - self._compact_idle
        candidates = await loop.run_in_executor(self._writer, self._candidates, idle_since)
        done = CompactionPass()
        while candidates and done.bytes_read < budget:
            done, candidates = await loop.run_in_executor(
                self._writer, compact_streams, self._write_conn, candidates, budget, done
            )
        self._stats["rows"] += done.rows_removed
        self._stats["bytes"] += done.bytes_read
        self._stats["passes"] += 1
        return done

    def _candidates(self, idle_since: float) -> list[int]:
        conn = self._write_conn
        assert conn is not None
        rows = conn.execute(Q["compact_candidates"], (idle_since, COMPACT_CANDIDATES))
        return [row[0] for row in rows]

    # -- group commit ------------------------------------------------------------------------

    async def _apply(self, batch: list[WriteOp], touches: Touches) -> list[Any]:
        loop = asyncio.get_running_loop()
        try:
            outcomes, removed = await loop.run_in_executor(
                self._writer, self._apply_batch, batch, touches
            )
        except (sqlite3.Error, OSError) as exc:
            if _no_space(exc):  # rolled back: nothing of the batch is stored
                raise StorageFull(f"no space left for the embedded store: {exc}") from None
            raise
        if self._events is not None:
            for stream_id in removed:
                self._events.deleted(stream_id)
        return outcomes

    def _apply_batch(self, batch: list[WriteOp], touches: Touches) -> tuple[list[Any], list[int]]:
        """Runs on the writer thread: one transaction for the whole batch.

        Touches go first, so a stream read before this batch is never reaped by it.
        """
        conn = self._write_conn
        assert conn is not None
        transaction = SqliteTransaction(conn)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(Q["touch"], [(when, sid) for sid, when in touches.values()])
            outcomes = run_batch(transaction.batch, batch, transaction.answer)
            transaction.flush()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite has rolled back already after SQLITE_FULL
                conn.execute("ROLLBACK")
            self._cache.clear()
            raise
        for path, (stream_id, when) in touches.items():
            cached = self._cache.get(path)
            if cached is not None and cached.stream_id == stream_id:
                self._cache[path] = with_access(cached, when)
        state = transaction.batch
        if state.removed or state.retained:
            # Erased bytes still sit in WAL frames and older page images: copy the zeroed pages
            # into relay.sqlite3 and empty the WAL before anyone is answered. The batch has
            # committed, so a failed checkpoint must not fail it; the next erasure's retries.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        for path in state.gone:
            self._cache.pop(path, None)
        if len(self._cache) + len(state.metas) > self._cache_limit:
            self._cache.clear()  # as a lookup does: creates alone filled it past any bound
        self._cache.update(state.metas)
        self._stats["rows_written"] += state.written
        self._stats["appends"] += state.appends
        return outcomes, state.removed


class SqliteTransaction:
    """Answers a batch's needs on the writer connection, inside its transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.batch = Batch()

    def answer(self, need: needs.Need) -> Any:
        conn = self.conn
        match need:
            case needs.Load(path):
                return load(conn, path)
            case needs.Producer(stream_id, producer_id):
                row = conn.execute(Q["producer"], (stream_id, producer_id)).fetchone()
                return ProducerState(row[0], row[1], decode_acks(row[2])) if row else None
            case needs.Inheriting(stream_id, offset):
                return [(r[0], r[1]) for r in conn.execute(Q["inheriting"], (stream_id, offset))]
            case needs.ReadRange(meta, start, end):
                return read_range(conn, meta, start, end)
            case needs.RetentionLimit(stream_id):
                return conn.execute(Q["retention_limit"], (stream_id,)).fetchone()[0]
            case needs.Inherited(stream_id):
                return conn.execute(Q["inherited"], (stream_id,)).fetchone()[0]
            case needs.Expired(now):
                return [row_meta(row) for row in conn.execute(Q["expired"], (now,))]
            case needs.Orphans():
                return [row[0] for row in conn.execute(Q["orphans"])]
            case needs.PurgeChain(stream_id):
                return [(r[0], r[1]) for r in conn.execute(Q["purge_chain"], (stream_id,))]
            case needs.Flush():
                self.flush()
            case needs.Insert():
                row = conn.execute(Q["insert_stream"], need.params()).fetchone()
                return with_segments(conn, row_meta(row))
            case needs.Erase(ids):
                doomed = (json.dumps(ids),)
                for table in ("chunks", "producers", "streams", "compact_pending"):
                    conn.execute(Q[f"erase_{table}"], doomed)
            case needs.SoftDelete(stream_id, inherited):
                conn.execute(Q["soft_delete"], (stream_id,))
                conn.execute(Q["erase_beyond"], (stream_id, inherited))
                conn.execute(Q["cut_across"], (stream_id, inherited))
            case needs.Retain(stream_id, horizon, upto):
                conn.execute(Q["set_horizon"], (stream_id, horizon))
                conn.execute(Q["trim_before"], (stream_id, upto))
        return None

    def flush(self) -> None:
        """Write what the batch staged: stream updates, producer states, then its rows."""
        batch, conn = self.batch, self.conn
        if batch.stream_updates:
            metas = batch.stream_updates.values()
            conn.executemany(Q["write_stream"], [_stream_row(m) for m in metas])
            conn.executemany(Q["mark_written"], [(m.stream_id, m.last_access) for m in metas])
            batch.stream_updates.clear()
        if batch.producer_writes:
            conn.executemany(
                Q["write_producer"],
                [
                    (sid, pid, st.epoch, st.last_seq, encode_acks(st.acks))
                    for (sid, pid), st in batch.producer_writes.items()
                ],
            )
            batch.producer_writes.clear()
        rows = batch.rows.drain()
        if rows:
            conn.executemany(Q["write_chunk"], rows)
            batch.written += len(rows)


def _stream_row(meta: StreamMeta) -> tuple[Any, ...]:
    closed_by = meta.closed_by
    return (
        meta.tail,
        int(meta.closed),
        meta.last_access,
        meta.stream_seq,
        closed_by.producer_id if closed_by else None,
        closed_by.epoch if closed_by else None,
        closed_by.seq if closed_by else None,
        meta.successor,
        meta.stream_id,
    )


def load(conn: sqlite3.Connection, path: str) -> StreamMeta | None:
    row = conn.execute(Q["load_stream"], (path,)).fetchone()
    return with_segments(conn, row_meta(row)) if row else None


def with_segments(conn: sqlite3.Connection, meta: StreamMeta) -> StreamMeta:
    if meta.source_id is None:
        chain = [(meta.stream_id, meta.fork_offset)]
    else:
        chain = [(row[0], row[1]) for row in conn.execute(Q["fork_chain"], (meta.stream_id,))]
    return replace(meta, segments=fork_segments(chain))


def _no_space(exc: BaseException) -> bool:
    """SQLITE_FULL (SQLite's word for ENOSPC), or the disk error itself from the OS."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def compact_streams(
    conn: sqlite3.Connection | None, candidates: list[int], budget: int, done: CompactionPass
) -> tuple[CompactionPass, list[int]]:
    """Merge the runs of the first candidates in one transaction, until it has read
    COMPACT_BYTES or the pass its ``budget``; the candidates left. Runs on the writer thread,
    so no batch writes a stream meanwhile; readers (WAL) see the old rows or the merged one."""
    assert conn is not None
    started = done.bytes_read
    taken = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        while taken < len(candidates) and done.bytes_read < budget:
            if done.bytes_read - started >= COMPACT_BYTES:
                break
            done = _compact_stream(conn, candidates[taken], budget, done)
            taken += 1
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return done, candidates[taken:]


def _compact_stream(
    conn: sqlite3.Connection, stream_id: int, budget: int, done: CompactionPass
) -> CompactionPass:
    """One stream's runs within the budget; unmarked once none is left."""
    bounds = conn.execute(Q["compact_bounds"], (stream_id,)).fetchall()
    chosen, finished = merges(bounds, budget, done.bytes_read)
    removed = read = 0
    for start, end, rows in chosen:
        parts = conn.execute(Q["compact_take"], (stream_id, start, end)).fetchall()
        conn.execute(Q["compact_drop"], (stream_id, start, end))
        conn.execute(Q["write_chunk"], (stream_id, start, end, b"".join(p[0] for p in parts)))
        removed += rows - 1
        read += end - start
    if finished:
        conn.execute(Q["compacted"], (stream_id,))
    return CompactionPass(done.streams + 1, done.rows_removed + removed, done.bytes_read + read)


def read_range(conn: sqlite3.Connection, meta: StreamMeta, start: int, end: int) -> bytes:
    out = bytearray()
    for stream_id, lo, hi in segment_ranges(meta, start, end):
        stitch(out, conn.execute(Q["read_rows"], (stream_id, lo, hi)).fetchall(), lo, hi)
    return bytes(out)
