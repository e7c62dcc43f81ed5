"""The embedded store: SQLite in WAL mode with group commit.

One writer thread owns the write connection. Requests queue operations; the committer takes
everything queued, applies it in one transaction (running the protocol's decisions against
the state as it stands inside that transaction), commits with ``synchronous=FULL`` (the WAL
is fsynced), and only then resolves each request. While one batch commits, the next fills.
Readers use their own connections in a small thread pool; WAL lets them run beside the writer.

Stream metadata is cached in memory. Only the writer thread changes the cache (after each
commit, and when loading a missing entry between commits), so a cached entry always equals
committed state and request paths that only need metadata never touch the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from protocol.append import AppendRequest, decide_append
from protocol.create import CreatePlan, CreateRequest, plan_create
from protocol.errors import NotFound, ProtocolError, StorageFull
from protocol.lifecycle import check_visible, is_expired
from protocol.model import ProducerState, StreamMeta, fork_segments
from protocol.retention import plan_horizon
from relay.store.base import (
    AppendResult,
    CreateResult,
    Revocation,
    StoreEvents,
    StoreStartupError,
    StoreStats,
)
from relay.store.batching import (
    AppendOp,
    Committer,
    CreateOp,
    DeleteOp,
    ReapOp,
    RetainOp,
    Touches,
    WriteOp,
)
from relay.store.common import (
    META_COLUMNS,
    StagedRows,
    after_append,
    decode_acks,
    encode_acks,
    inheriting_sql,
    numbered_sql,
    purge_chain_sql,
    refuse_inherited,
    resolve_fork,
    retention_limit_sql,
    row_meta,
    segment_ranges,
    stitch,
)

_PURGE_CHAIN = purge_chain_sql("streams", "?")
_RETENTION_LIMIT = retention_limit_sql("streams", "?")
_INHERITING = inheriting_sql("streams", "?", "?")
CACHE_LIMIT = 100_000


@dataclass
class _Batch:
    """What one transaction has staged, and what the cache and the listener learn after it."""

    rows: StagedRows = field(default_factory=StagedRows)
    written: int = 0
    updated: dict[str, StreamMeta | None] = field(default_factory=dict)  # None: gone
    removed: list[int] = field(default_factory=list)  # stream ids deleted or soft-deleted


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


class SqliteStore:
    """The embedded, durable default store (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        max_batch_ops: int = 1024,
        max_batch_bytes: int = 16 * 1024 * 1024,
        commit_interval: float = 0.0,
        max_fork_scan: int = 16 * 1024 * 1024,
    ) -> None:
        self._dir = Path(data_dir)
        self._max_fork_scan = max_fork_scan
        self._db_path = self._dir / "relay.sqlite3"
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="relay-sqlite-writer")
        self._committer = Committer(
            self._apply_in_writer,
            max_ops=max_batch_ops,
            max_bytes=max_batch_bytes,
            min_interval=commit_interval,
        )
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="relay-sqlite-reader")
        self._local = threading.local()
        self._write_conn: sqlite3.Connection | None = None
        self._cache: dict[str, StreamMeta] = {}
        self._events: StoreEvents | None = None
        self._lock_file: IO[str] | None = None
        self._stats = {"appends": 0, "rows_written": 0}

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
        self._events = events
        self._committer.events = events

    def stats(self) -> StoreStats:
        return replace(
            self._committer.stats(),
            appends=self._stats["appends"],
            rows_written=self._stats["rows_written"],
        )

    # -- the interface -----------------------------------------------------------------------

    async def create(self, request: CreateRequest, now: float) -> CreateResult:
        request = await resolve_fork(
            request,
            lambda path: self.head(path, now, touch=False),
            self.read,
            self._max_fork_scan,
        )
        result: CreateResult = await self._committer.submit(
            CreateOp(request, now), len(request.body)
        )
        return result

    async def append(self, path: str, request: AppendRequest, now: float) -> AppendResult:
        result: AppendResult = await self._committer.submit(
            AppendOp(path, request, now), len(request.data)
        )
        return result

    async def delete(self, path: str, now: float, revoke: Revocation | None = None) -> StreamMeta:
        result: StreamMeta = await self._committer.submit(DeleteOp(path, now, revoke))
        return result

    async def inheriting(self, path: str, offset: int) -> list[str]:
        def query() -> list[str]:
            conn = self._reader()
            row = conn.execute("SELECT id FROM streams WHERE path = ?", (path,)).fetchone()
            if row is None:
                return []
            return [r[1] for r in conn.execute(_INHERITING, (row[0], offset)).fetchall()]

        return await asyncio.get_running_loop().run_in_executor(self._readers, query)

    async def reap(self, now: float) -> int:
        result: int = await self._committer.submit(ReapOp(now))
        return result

    async def retain(self, path: str, offset: int, now: float) -> StreamMeta:
        result: StreamMeta = await self._committer.submit(RetainOp(path, offset, now))
        return result

    async def head(self, path: str, now: float, *, touch: bool) -> StreamMeta:
        meta = self._cache.get(path)
        if meta is None:
            loop = asyncio.get_running_loop()
            meta = await loop.run_in_executor(self._writer, self._load_into_cache, path)
        if meta is None:
            raise NotFound()
        pending = self._committer.pending_touch(path, meta.stream_id)
        if pending is not None:
            meta = _with_access(meta, pending)
        check_visible(meta, now)
        if touch and meta.ttl is not None:
            self._committer.touch(path, meta.stream_id, now)
            return _with_access(meta, now)
        return meta

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

    def tracked(self, path: str, position: int, now: float) -> StreamMeta | None:
        """None: ``head`` already answers from the in-memory cache, kept by the only writer."""
        return None

    async def read(self, meta: StreamMeta, start: int, end: int) -> bytes:
        if start >= end:
            return b""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_range, meta, start, end)

    # -- group commit ------------------------------------------------------------------------

    async def _apply_in_writer(self, batch: list[WriteOp], touches: Touches) -> list[Any]:
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

    def _load_into_cache(self, path: str) -> StreamMeta | None:
        """Writer thread, between commits: what it loads is committed and stays current."""
        assert self._write_conn is not None
        meta = self._load(self._write_conn, path)
        if meta is not None:
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[path] = meta
        return meta

    def _apply_batch(self, batch: list[WriteOp], touches: Touches) -> tuple[list[Any], list[int]]:
        """Runs on the writer thread: one transaction for the whole batch.

        Touches go first, so a stream read before this batch is never reaped by it.
        """
        conn = self._write_conn
        assert conn is not None
        state = _Batch()
        outcomes: list[Any] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for stream_id, when in touches.values():
                conn.execute(
                    "UPDATE streams SET last_access = max(last_access, ?) WHERE id = ?",
                    (when, stream_id),
                )
            for op in batch:
                try:
                    outcomes.append(self._apply(conn, state, op))
                except ProtocolError as exc:
                    outcomes.append(exc)
            self._flush_rows(conn, state)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite has rolled back already after SQLITE_FULL
                conn.execute("ROLLBACK")
            self._cache.clear()
            raise
        if state.removed or any(isinstance(op, RetainOp) for op in batch):
            # Erased bytes still sit in WAL frames and older page images: copy the zeroed pages
            # into relay.sqlite3 and empty the WAL before anyone is answered. The batch has
            # committed, so a failed checkpoint must not fail it; the next erasure's retries.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        for path, (stream_id, when) in touches.items():
            cached = self._cache.get(path)
            if cached is not None and cached.stream_id == stream_id:
                self._cache[path] = _with_access(cached, when)
        for path, meta in state.updated.items():
            if meta is None:
                self._cache.pop(path, None)
            else:
                self._cache[path] = meta
        self._stats["rows_written"] += state.written
        return outcomes, state.removed

    def _apply(self, conn: sqlite3.Connection, state: _Batch, op: WriteOp) -> Any:
        match op:
            case AppendOp(path, request, now):
                return self._do_append(conn, state, path, request, now)
            case CreateOp(request, now):
                return self._do_create(conn, state, request, now)
            case DeleteOp(path, now, revoke):
                return self._do_delete(conn, state, path, now, revoke)
            case ReapOp(now):
                return self._do_reap(conn, state, now)
            case RetainOp(path, offset, now):
                return self._do_retain(conn, state, path, offset, now)

    def _flush_rows(self, conn: sqlite3.Connection, state: _Batch) -> None:
        rows = state.rows.drain()
        if rows:
            conn.executemany(
                "INSERT INTO chunks (stream_id, start_pos, end_pos, data) VALUES (?, ?, ?, ?)",
                rows,
            )
            state.written += len(rows)

    def _stage(
        self, conn: sqlite3.Connection, state: _Batch, stream_id: int, start: int, data: bytes
    ) -> None:
        if not state.rows.stage(stream_id, start, data):
            self._flush_rows(conn, state)
            state.rows.stage(stream_id, start, data)

    # -- operations (writer thread, inside the batch transaction) ----------------------------

    def _do_create(
        self, conn: sqlite3.Connection, state: _Batch, request: CreateRequest, now: float
    ) -> CreateResult:
        self._flush_rows(conn, state)  # a fork may read what this batch appended
        existing = self._load(conn, request.path)
        if existing is not None and _is_dead(existing, now):
            self._remove(conn, state, existing)
            existing = None
        source: StreamMeta | None = None
        if request.fork is not None:
            source = self._load(conn, request.fork.source_path)
            if source is None or (not source.soft_deleted and is_expired(source, now)):
                raise NotFound("fork source not found")
        outcome = plan_create(existing, source, request)
        if isinstance(outcome, StreamMeta):
            return CreateResult(outcome, created=False)
        meta = self._insert(conn, request.path, outcome, now)
        state.updated[meta.path] = meta
        self._stage(conn, state, meta.stream_id, outcome.fork_offset, outcome.data)
        self._stats["appends"] += 1 if outcome.data else 0
        return CreateResult(meta, created=True)

    def _insert(
        self, conn: sqlite3.Connection, path: str, plan: CreatePlan, now: float
    ) -> StreamMeta:
        source_id = plan.source.stream_id if plan.source is not None else None
        forked_from = plan.source.path if plan.source is not None else None
        tail = plan.fork_offset + len(plan.data)
        row = conn.execute(
            "INSERT INTO streams (path, content_type, tail, closed, ttl, expires_at, "
            "last_access, created_at, source_id, forked_from, fork_offset, retained_from) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {META_COLUMNS}",
            (
                path,
                plan.content_type,
                tail,
                int(plan.closed),
                plan.expiry.ttl,
                plan.expiry.expires_at,
                now,
                now,
                source_id,
                forked_from,
                plan.fork_offset,
                plan.retained_from,
            ),
        ).fetchone()
        return self._with_segments(conn, row_meta(row))

    def _do_append(
        self,
        conn: sqlite3.Connection,
        state: _Batch,
        path: str,
        request: AppendRequest,
        now: float,
    ) -> AppendResult:
        meta = self._visible(conn, path, now)
        producer_state = None
        if request.producer is not None:
            producer_state = self._producer(conn, meta.stream_id, request.producer.producer_id)
        plan = decide_append(meta, producer_state, request)
        if not plan.write:
            return AppendResult(meta, plan, meta.tail)
        after = after_append(meta, plan, now)
        closed_by = after.closed_by if plan.close else None
        conn.execute(
            "UPDATE streams SET tail = ?, closed = ?, last_access = ?, stream_seq = ?, "
            "closed_by_id = ?, closed_by_epoch = ?, closed_by_seq = ?, successor = ? WHERE id = ?",
            (
                after.tail,
                int(after.closed),
                after.last_access,
                after.stream_seq,
                closed_by.producer_id if closed_by else None,
                closed_by.epoch if closed_by else None,
                closed_by.seq if closed_by else None,
                after.successor,
                meta.stream_id,
            ),
        )
        if plan.producer is not None and plan.producer_state is not None:
            conn.execute(
                "INSERT INTO producers (stream_id, producer_id, epoch, last_seq, acks) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (stream_id, producer_id) DO UPDATE "
                "SET epoch = excluded.epoch, last_seq = excluded.last_seq, acks = excluded.acks",
                (
                    meta.stream_id,
                    plan.producer.producer_id,
                    plan.producer_state.epoch,
                    plan.producer_state.last_seq,
                    encode_acks(plan.producer_state.acks),
                ),
            )
        self._stage(conn, state, meta.stream_id, meta.tail, plan.data)
        if plan.data:
            self._stats["appends"] += 1
        state.updated[path] = after
        return AppendResult(after, plan, meta.tail)

    def _do_delete(
        self,
        conn: sqlite3.Connection,
        state: _Batch,
        path: str,
        now: float,
        revoke: Revocation | None = None,
    ) -> StreamMeta:
        meta = self._visible(conn, path, now)
        self._flush_rows(conn, state)
        if revoke is not None:
            found = conn.execute(_INHERITING, (meta.stream_id, revoke.offset)).fetchall()
            doomed = refuse_inherited([(r[0], r[1]) for r in found], revoke.forks)
            if doomed:
                for stream_id, fork_path in found:
                    state.updated[fork_path] = None
                    state.removed.append(stream_id)
                marks = ",".join("?" * len(doomed))
                for table, column in (("chunks", "stream_id"), ("producers", "stream_id")):
                    conn.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", doomed)
                conn.execute(f"DELETE FROM streams WHERE id IN ({marks})", doomed)
        self._remove(conn, state, meta)
        return meta

    def _do_retain(
        self, conn: sqlite3.Connection, state: _Batch, path: str, offset: int, now: float
    ) -> StreamMeta:
        meta = self._visible(conn, path, now)
        self._flush_rows(conn, state)
        before = self._range(conn, meta, offset - 1, offset) if offset > 0 else b""
        horizon = plan_horizon(meta, offset, before)
        if horizon is None:
            return meta
        conn.execute("UPDATE streams SET retained_from = ? WHERE id = ?", (horizon, meta.stream_id))
        floor = conn.execute(_RETENTION_LIMIT, (meta.stream_id,)).fetchone()[0]
        limit = horizon if floor is None else min(horizon, floor)
        conn.execute(
            "DELETE FROM chunks WHERE stream_id = ? AND end_pos <= ?", (meta.stream_id, limit)
        )
        after = replace(meta, retained_from=horizon)
        state.updated[path] = after
        return after

    def _do_reap(self, conn: sqlite3.Connection, state: _Batch, now: float) -> int:
        self._flush_rows(conn, state)
        rows = conn.execute(
            f"SELECT {META_COLUMNS} FROM streams WHERE soft_deleted = 0 AND ("
            "(expires_at IS NOT NULL AND expires_at <= ?) OR "
            "(ttl IS NOT NULL AND last_access + ttl <= ?))",
            (now, now),
        ).fetchall()
        for row in rows:
            self._remove(conn, state, row_meta(row))
        orphans = conn.execute(
            "SELECT id FROM streams s WHERE soft_deleted = 1 AND NOT EXISTS "
            "(SELECT 1 FROM streams f WHERE f.source_id = s.id)"
        ).fetchall()
        for (stream_id,) in orphans:
            self._purge(conn, state, stream_id)
        return len(rows)

    # -- helpers -----------------------------------------------------------------------------

    def _remove(self, conn: sqlite3.Connection, state: _Batch, meta: StreamMeta) -> None:
        """Soft-delete while forks reference the stream, erasing every byte no fork inherits;
        otherwise purge and cascade."""
        state.removed.append(meta.stream_id)
        inherited = conn.execute(
            "SELECT max(fork_offset) FROM streams WHERE source_id = ?", (meta.stream_id,)
        ).fetchone()[0]
        if inherited is not None:
            conn.execute("UPDATE streams SET soft_deleted = 1 WHERE id = ?", (meta.stream_id,))
            conn.execute(
                "DELETE FROM chunks WHERE stream_id = ? AND start_pos >= ?",
                (meta.stream_id, inherited),
            )
            conn.execute(
                "UPDATE chunks SET data = substr(data, 1, ? - start_pos), end_pos = ? "
                "WHERE stream_id = ? AND start_pos < ? AND end_pos > ?",
                (inherited, inherited, meta.stream_id, inherited, inherited),
            )
            state.updated[meta.path] = replace(meta, soft_deleted=True)
            return
        self._purge(conn, state, meta.stream_id)

    def _purge(self, conn: sqlite3.Connection, state: _Batch, stream_id: int) -> None:
        doomed = [row[0] for row in conn.execute(_PURGE_CHAIN, (stream_id,)).fetchall()]
        marks = ",".join("?" * len(doomed))
        for (path,) in conn.execute(f"SELECT path FROM streams WHERE id IN ({marks})", doomed):
            state.updated[path] = None
        conn.execute(f"DELETE FROM chunks WHERE stream_id IN ({marks})", doomed)
        conn.execute(f"DELETE FROM producers WHERE stream_id IN ({marks})", doomed)
        conn.execute(f"DELETE FROM streams WHERE id IN ({marks})", doomed)

    def _producer(
        self, conn: sqlite3.Connection, stream_id: int, producer_id: str
    ) -> ProducerState | None:
        row = conn.execute(
            "SELECT epoch, last_seq, acks FROM producers WHERE stream_id = ? AND producer_id = ?",
            (stream_id, producer_id),
        ).fetchone()
        return ProducerState(row[0], row[1], decode_acks(row[2])) if row else None

    def _visible(self, conn: sqlite3.Connection, path: str, now: float) -> StreamMeta:
        meta = self._load(conn, path)
        if meta is None:
            raise NotFound()
        check_visible(meta, now)
        return meta

    def _load(self, conn: sqlite3.Connection, path: str) -> StreamMeta | None:
        row = conn.execute(f"SELECT {META_COLUMNS} FROM streams WHERE path = ?", (path,)).fetchone()
        return self._with_segments(conn, row_meta(row)) if row else None

    def _with_segments(self, conn: sqlite3.Connection, meta: StreamMeta) -> StreamMeta:
        chain = [(meta.stream_id, meta.fork_offset)]
        source_id = meta.source_id
        while source_id is not None:
            row = conn.execute(
                "SELECT id, fork_offset, source_id FROM streams WHERE id = ?", (source_id,)
            ).fetchone()
            if row is None:
                break
            chain.append((row[0], row[1]))
            source_id = row[2]
        return replace(meta, segments=fork_segments(chain))

    def _read_range(self, meta: StreamMeta, start: int, end: int) -> bytes:
        return self._range(self._reader(), meta, start, end)

    @staticmethod
    def _range(conn: sqlite3.Connection, meta: StreamMeta, start: int, end: int) -> bytes:
        out = bytearray()
        for stream_id, lo, hi in segment_ranges(meta, start, end):
            rows = conn.execute(
                "SELECT start_pos, data FROM chunks WHERE stream_id = ? AND end_pos > ? "
                "AND start_pos < ? ORDER BY start_pos",
                (stream_id, lo, hi),
            ).fetchall()
            stitch(out, rows, lo, hi)
        return bytes(out)


def _no_space(exc: BaseException) -> bool:
    """SQLITE_FULL (SQLite's word for ENOSPC), or the disk error itself from the OS."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def _with_access(meta: StreamMeta, when: float) -> StreamMeta:
    return replace(meta, last_access=max(meta.last_access, when))


def _is_dead(meta: StreamMeta, now: float) -> bool:
    return not meta.soft_deleted and is_expired(meta, now)
