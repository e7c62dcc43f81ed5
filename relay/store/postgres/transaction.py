"""How Postgres runs a batch: the engine's plans, answered with awaits on the committer's
connection, inside one transaction.

:meth:`PgTransaction.lock` opens it: every stream the batch appends to and every stream it
touches is locked in one id-ordered statement (relays never deadlock), touches are applied
first (a stream read before the batch is never reaped by it), and the producers the appends
name are read in a second statement. Then each operation's plan runs
(:func:`relay.store.engine.engine.run_batch_async`); a plan's ``Load`` locks its row
(``FOR UPDATE``). Staged appends of every stream go out at the end as one statement
(:meth:`PgTransaction.write`, ``write`` in ``sql/postgres/queries.sql``) with the batch's
NOTIFY: one round trip however many streams the batch touched. The same method, given the
tails it expects, is the guarded write (see :mod:`relay.store.postgres.guarded`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import asyncpg

from protocol.model import ProducerState, StreamMeta, fork_segments
from relay.store.batching import AppendOp, Touches, WriteOp
from relay.store.common import (
    decode_acks,
    encode_acks,
    named_queries,
    row_meta,
    segment_ranges,
    stitch,
)
from relay.store.engine import needs
from relay.store.engine.plan import Batch
from relay.store.postgres.notify import CHANNEL

if TYPE_CHECKING:
    from relay.store.postgres.guarded import Divergence

Q = named_queries("postgres")


class PgTransaction:
    """Answers one batch's needs on ``conn``; ``divergence`` hears every row it locks, and
    every path this relay acknowledged writes to that it finds without a stream."""

    def __init__(self, conn: asyncpg.Connection, batch: Batch, divergence: Divergence) -> None:
        self.conn = conn
        self.batch = batch
        self._divergence = divergence
        self._locked = divergence.check

    async def lock(self, ops: list[WriteOp], touches: Touches) -> None:
        """The batch's opening statements (see the module docstring)."""
        conn, batch = self.conn, self.batch
        appends = [op for op in ops if isinstance(op, AppendOp)]
        paths = {op.path for op in appends}
        if not paths and not touches:
            return
        touched = sorted({stream_id for stream_id, _ in touches.values()})
        for row in await conn.fetch(Q["lock"], sorted(paths), touched):
            if row["path"] in paths:
                meta = await with_segments(conn, row_meta(row))
                batch.metas[meta.path] = meta
                batch.locked[meta.stream_id] = (meta.tail, meta.closed)
                self._locked(meta)
        if touches:
            entries = list(touches.values())
            await conn.execute(Q["touch"], [e[0] for e in entries], [e[1] for e in entries])
            for path, (_, when) in touches.items():
                locked = batch.metas.get(path)
                if locked is not None and when > locked.last_access:
                    batch.metas[path] = replace(locked, last_access=when)
        wanted = {
            (batch.metas[op.path].stream_id, op.request.producer.producer_id)
            for op in appends
            if op.request.producer and op.path in batch.metas
        }
        if not wanted:
            return
        ids = sorted({key[0] for key in wanted})
        names = sorted({key[1] for key in wanted})
        batch.producers = dict.fromkeys(wanted)  # named but not found: known to be absent
        for row in await conn.fetch(Q["producers"], ids, names):
            batch.producers[(row[0], row[1])] = ProducerState(row[2], row[3], decode_acks(row[4]))

    async def answer(self, need: needs.Need) -> Any:
        conn = self.conn
        match need:
            case needs.Load(path):
                row = await conn.fetchrow(Q["load_stream_locked"], path)
                if row is None:
                    acknowledged = self._divergence.acknowledged(path)
                    if acknowledged is not None:
                        removed = await conn.fetchval(Q["removed"], acknowledged)
                        self._divergence.missing(path, acknowledged, bool(removed))
                    return None
                meta = await with_segments(conn, row_meta(row))
                self._locked(meta)
                return meta
            case needs.Producer(stream_id, producer_id):
                row = await conn.fetchrow(Q["producer"], stream_id, producer_id)
                return ProducerState(row[0], row[1], decode_acks(row[2])) if row else None
            case needs.Inheriting(stream_id, offset):
                return [(r[0], r[1]) for r in await conn.fetch(Q["inheriting"], stream_id, offset)]
            case needs.ReadRange(meta, start, end):
                return await read_range(conn, meta, start, end)
            case needs.RetentionLimit(stream_id):
                return await conn.fetchval(Q["retention_limit"], stream_id)
            case needs.Inherited(stream_id):
                return await conn.fetchval(Q["inherited"], stream_id)
            case needs.Expired(now):
                return [row_meta(row) for row in await conn.fetch(Q["expired"], now)]
            case needs.Orphans():
                return [row[0] for row in await conn.fetch(Q["orphans"])]
            case needs.PurgeChain(stream_id):
                return [(r[0], r[1]) for r in await conn.fetch(Q["purge_chain"], stream_id)]
            case needs.Flush():
                await self.write()
            case needs.Insert():
                row = await conn.fetchrow(Q["insert_stream"], *need.params())
                return await with_segments(conn, row_meta(row)) if row else None
            case needs.Erase(ids):
                for table in ("chunks", "producers", "streams"):
                    await conn.execute(Q[f"erase_{table}"], list(ids))
                await conn.execute(Q["tombstones"], list(ids))
            case needs.SoftDelete(stream_id, inherited):
                await conn.execute(Q["soft_delete"], stream_id)
                await conn.execute(Q["erase_beyond"], stream_id, inherited)
                await conn.execute(Q["cut_across"], stream_id, inherited)
            case needs.Retain(stream_id, horizon, upto):
                await conn.execute(Q["set_horizon"], stream_id, horizon)
                await conn.execute(Q["trim_before"], stream_id, upto)
        return None

    async def write(
        self, notify: str | None = None, *, expected: dict[int, int] | None = None
    ) -> None:
        """Everything staged (rows, stream updates, producer states) and the batch's NOTIFY,
        as one statement. With ``expected`` (stream id -> tail it must still have) it is the
        guarded write."""
        batch = self.batch
        rows = batch.rows.drain()
        metas = sorted(batch.stream_updates.values(), key=lambda m: m.stream_id)  # lock order
        keys = list(batch.producer_writes)
        if not rows and not metas and not keys and notify is None:
            return
        producers = [batch.producer_writes[k] for k in keys]
        guard = () if expected is None else ([expected[m.stream_id] for m in metas],)
        await self.conn.execute(
            Q["write"] if expected is None else Q["guarded_write"],
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            [m.stream_id for m in metas],
            [m.tail for m in metas],
            [m.closed for m in metas],
            [m.last_access for m in metas],
            [m.stream_seq for m in metas],
            [m.closed_by.producer_id if m.closed_by else None for m in metas],
            [m.closed_by.epoch if m.closed_by else None for m in metas],
            [m.closed_by.seq if m.closed_by else None for m in metas],
            [k[0] for k in keys],
            [k[1] for k in keys],
            [p.epoch for p in producers],
            [p.last_seq for p in producers],
            CHANNEL,
            notify,
            [encode_acks(p.acks) for p in producers],
            [m.successor for m in metas],
            *guard,
        )
        batch.written += len(rows)
        batch.stream_updates.clear()
        batch.producer_writes.clear()


async def read_range(conn: asyncpg.Connection, meta: StreamMeta, start: int, end: int) -> bytes:
    out = bytearray()
    for stream_id, lo, hi in segment_ranges(meta, start, end):
        stitch(out, await conn.fetch(Q["read_rows"], stream_id, lo, hi), lo, hi)
    return bytes(out)


async def with_segments(conn: asyncpg.Connection, meta: StreamMeta) -> StreamMeta:
    if meta.source_id is None:
        chain = [(meta.stream_id, meta.fork_offset)]
    else:
        chain = [(row[0], row[1]) for row in await conn.fetch(Q["fork_chain"], meta.stream_id)]
    return replace(meta, segments=fork_segments(chain))
