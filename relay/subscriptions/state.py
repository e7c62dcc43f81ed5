"""Durable subscription state: every transition is one transaction over the shared database.

Rows (``relay_subscriptions``, ``relay_subscription_links``; see the ``NNN_subscriptions.sql``
migrations) are locked before they are read (Postgres ``FOR UPDATE``; SQLite transactions are
exclusive), the pure rules in :mod:`protocol.subscriptions` decide, and the new state is
written in the same transaction. So relays sharing a database agree on generations, leases
and cursors, and a relay that dies mid-way leaves either the old state or the new one.

A pending delivery (a webhook POST, or a pull-wake event still to be appended) is the
subscription row's ``due_at``; a relay takes it by writing itself into ``owner`` until
``owner_until``, skipping rows another relay holds, so each wake is delivered by one relay at
a time. A claim that runs out (its relay died) is taken over by the next relay that looks.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from protocol import subscriptions as rules
from protocol.glob import compile_glob
from protocol.subscriptions import LinkState, SubscriptionConfig, TokenClaims, WakeRequest
from relay.subscriptions.db import Contention, Database, Row, Tx

_SUB_COLUMNS = (
    "id, kind, pattern, config, config_hash, base_url, created_at, deleted_at, generation, "
    "wake_id, trigger_path, holder, lease_until, status, attempt, due_at, owner, owner_until"
)
_TAIL = "(SELECT s.tail FROM {streams} s WHERE s.path = l.path AND NOT s.soft_deleted)"
_LINKS = (
    "SELECT l.path, l.explicit, l.glob, l.acked, coalesce(" + _TAIL + ", 0), l.snapshot "
    "FROM relay_subscription_links l WHERE l.subscription_id = ? ORDER BY l.path"
)
_STREAM_TAIL = "SELECT tail FROM {streams} WHERE path = ? AND NOT soft_deleted"


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subscription row."""

    id: str
    config: SubscriptionConfig
    config_hash: str
    base_url: str
    created_at: float
    deleted: bool
    generation: int
    wake_id: str | None
    trigger_path: str | None
    holder: str | None
    lease_until: float | None
    status: str
    attempt: int
    due_at: float | None
    owner: str | None
    owner_until: float | None

    @staticmethod
    def from_row(row: Row) -> Subscription:
        return Subscription(
            id=row[0],
            config=SubscriptionConfig.from_json(row[3]),
            config_hash=row[4],
            base_url=row[5],
            created_at=row[6],
            deleted=row[7] is not None,
            generation=row[8],
            wake_id=row[9],
            trigger_path=row[10],
            holder=row[11],
            lease_until=row[12],
            status=row[13],
            attempt=row[14],
            due_at=row[15],
            owner=row[16],
            owner_until=row[17],
        )


@dataclass(frozen=True, slots=True)
class View:
    """A subscription and its links, as one transaction saw them."""

    sub: Subscription
    links: tuple[LinkState, ...]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A wake this relay has taken to deliver."""

    view: View
    attempt: int
    reissued: bool  # the previous owner's claim ran out: this is a fresh wake


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a callback, ack, release or delivery result did."""

    next_wake: bool = False
    woke: bool = False  # a wake was issued (a delivery may be due)


def new_wake_id() -> str:
    return "w_" + secrets.token_hex(12)


async def _load(tx: Tx, sub_id: str) -> Subscription | None:
    rows = await tx.fetch(
        f"SELECT {_SUB_COLUMNS} FROM relay_subscriptions WHERE id = ? {{lock}}", sub_id
    )
    return Subscription.from_row(rows[0]) if rows else None


async def _live(tx: Tx, sub_id: str) -> Subscription:
    sub = await _load(tx, sub_id)
    if sub is None or sub.deleted:
        raise rules.SubscriptionNotFound()
    return sub


async def _links(tx: Tx, sub_id: str) -> tuple[LinkState, ...]:
    rows = await tx.fetch(_LINKS, sub_id)
    return tuple(LinkState(r[0], bool(r[1]), bool(r[2]), r[3], r[4], r[5]) for r in rows)


async def _tail(tx: Tx, path: str) -> int:
    rows = await tx.fetch(_STREAM_TAIL, path)
    return int(rows[0][0]) if rows else 0


async def _link(tx: Tx, sub_id: str, path: str, acked: int, *, explicit: bool) -> None:
    column = "explicit" if explicit else "glob"
    await tx.execute(
        f"INSERT INTO relay_subscription_links (subscription_id, path, {column}, acked, "
        "stream_id) VALUES (?, ?, 1, ?, (SELECT id FROM {streams} WHERE path = ? "
        f"AND NOT soft_deleted)) ON CONFLICT (subscription_id, path) DO UPDATE SET {column} = 1",
        sub_id,
        path,
        acked,
        path,
    )


async def _set(tx: Tx, sub_id: str, **values: object) -> None:
    assignments = ", ".join(f"{name} = ?" for name in values)
    await tx.execute(
        f"UPDATE relay_subscriptions SET {assignments} WHERE id = ?", *values.values(), sub_id
    )


async def _clear_wake(tx: Tx, sub_id: str) -> None:
    await _set(
        tx, sub_id, wake_id=None, holder=None, lease_until=None, due_at=None, owner=None,
        owner_until=None, attempt=0, status="active",
    )  # fmt: skip


async def _apply_acks(tx: Tx, sub_id: str, acks: dict[str, int]) -> None:
    for path, position in acks.items():
        await tx.execute(
            "UPDATE relay_subscription_links SET acked = ? WHERE subscription_id = ? AND path = ?",
            position,
            sub_id,
            path,
        )


async def _issue_wake(
    tx: Tx, sub: Subscription, now: float, *, deliver: bool = True
) -> Subscription | None:
    """A new wake (generation + 1, fresh wake id, tails snapshotted) if work is pending.

    ``deliver`` queues its delivery (webhook POST or wake event); a claim that creates its
    own wake needs none.
    """
    links = await _links(tx, sub.id)
    trigger = rules.first_pending(links)
    if trigger is None:
        return None
    await tx.execute(
        "UPDATE relay_subscription_links SET snapshot = coalesce("
        + _TAIL.replace("l.path", "relay_subscription_links.path")
        + ", 0) WHERE subscription_id = ?",
        sub.id,
    )
    generation, wake_id = sub.generation + 1, new_wake_id()
    webhook = sub.config.kind == rules.WEBHOOK
    await _set(
        tx, sub.id, generation=generation, wake_id=wake_id, trigger_path=trigger, holder=None,
        lease_until=now + sub.config.lease_ttl_ms / 1000 if webhook else None,
        due_at=now if deliver else None, owner=None, owner_until=None, attempt=0,
    )  # fmt: skip
    return await _load(tx, sub.id)


class SubscriptionState:
    """Every durable transition a subscription makes (see the module docstring)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- management (6.2-6.4) ----------------------------------------------------------------

    async def create(
        self, sub_id: str, config: SubscriptionConfig, base_url: str, now: float
    ) -> tuple[View, bool]:
        """Create, or re-confirm an identical configuration; SubscriptionExists (409) if the
        id holds another. A tombstoned id is reused, its generation kept so old tokens stay
        fenced. Pattern matches are linked at their tails (6.2's eager backfill)."""
        try:
            return await self._create(sub_id, config, base_url, now)
        except Contention:  # another relay created the same id at the same moment
            return await self._create(sub_id, config, base_url, now)

    async def _create(
        self, sub_id: str, config: SubscriptionConfig, base_url: str, now: float
    ) -> tuple[View, bool]:
        digest = config.hash()
        async with self.db.transaction() as tx:
            old = await _load(tx, sub_id)
            if old is not None and not old.deleted:
                if old.config_hash != digest:
                    raise rules.SubscriptionExists()
                return View(old, await _links(tx, sub_id)), False
            generation = old.generation if old is not None else 0
            if old is not None:
                await tx.execute("DELETE FROM relay_subscriptions WHERE id = ?", sub_id)
                await tx.execute(
                    "DELETE FROM relay_subscription_links WHERE subscription_id = ?", sub_id
                )
            await tx.execute(
                "INSERT INTO relay_subscriptions (id, kind, pattern, config, config_hash, "
                "base_url, created_at, generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                sub_id, config.kind, config.pattern, config.to_json(), digest, base_url, now,
                generation,
            )  # fmt: skip
            for path in config.streams:
                await _link(tx, sub_id, path, await _tail(tx, path), explicit=True)
            if config.pattern is not None:
                for path, tail in await _matching_streams(tx, config.pattern, None):
                    await _link(tx, sub_id, path, tail, explicit=False)
            created = await _load(tx, sub_id)
            assert created is not None
            return View(created, await _links(tx, sub_id)), True

    async def get(self, sub_id: str) -> View:
        async with self.db.transaction(write=False) as tx:
            sub = await _live(tx, sub_id)
            return View(sub, await _links(tx, sub_id))

    async def delete(self, sub_id: str, now: float) -> None:
        """Tombstone: the wake is cleared, so in-flight callbacks, acks and releases fail."""
        async with self.db.transaction() as tx:
            sub = await _load(tx, sub_id)
            if sub is None or sub.deleted:
                return
            await _clear_wake(tx, sub_id)
            await _set(tx, sub_id, deleted_at=now)
            await tx.execute(
                "DELETE FROM relay_subscription_links WHERE subscription_id = ?", sub_id
            )

    async def add_streams(self, sub_id: str, paths: Iterable[str]) -> None:
        async with self.db.transaction() as tx:
            await _live(tx, sub_id)
            for path in paths:
                await _link(tx, sub_id, path, await _tail(tx, path), explicit=True)

    async def remove_stream(self, sub_id: str, path: str) -> None:
        """Drop the explicit link; a stream the pattern matches stays linked by the glob."""
        async with self.db.transaction() as tx:
            sub = await _live(tx, sub_id)
            pattern = sub.config.pattern
            glob = 1 if pattern is not None and compile_glob(pattern)(path) else 0
            await tx.execute(
                "UPDATE relay_subscription_links SET explicit = 0, glob = ? "
                "WHERE subscription_id = ? AND path = ? AND glob = 0",
                glob,
                sub_id,
                path,
            )
            await tx.execute(
                "UPDATE relay_subscription_links SET explicit = 0 "
                "WHERE subscription_id = ? AND path = ?",
                sub_id,
                path,
            )
            await tx.execute(
                "DELETE FROM relay_subscription_links WHERE subscription_id = ? AND path = ? "
                "AND explicit = 0 AND glob = 0",
                sub_id,
                path,
            )

    async def link_discovered(self, sub_ids: Iterable[str], path: str, acked: int) -> None:
        """6.2: a stream a pattern matches, seen appending, is linked before that append."""
        async with self.db.transaction() as tx:
            for sub_id in sorted(sub_ids):  # one lock order for every relay: no deadlocks
                sub = await _load(tx, sub_id)
                if sub is not None and not sub.deleted:
                    await _link(tx, sub_id, path, acked, explicit=False)

    # -- waking (7) ----------------------------------------------------------------------------

    async def try_wake(self, sub_id: str, now: float) -> bool:
        """Issue a wake if the subscription is idle and has pending work."""
        async with self.db.transaction() as tx:
            sub = await _load(tx, sub_id)
            if sub is None or sub.deleted or sub.wake_id is not None or sub.holder is not None:
                return False
            return await _issue_wake(tx, sub, now) is not None

    async def finish(
        self,
        sub_id: str,
        claims: TokenClaims,
        request: WakeRequest,
        kind: str,
        now: float,
        *,
        release: bool = False,
    ) -> Outcome:
        """Webhook callback, pull-wake ack (both also heartbeats), or release: fenced by
        generation and wake id, acks checked, and with ``done`` (or release) the wake ends and
        a new one is issued if work remains."""
        async with self.db.transaction() as tx:
            sub = await _live(tx, sub_id)
            if sub.config.kind != kind:
                raise rules.InvalidRequest(f"subscription is not {kind}")
            rules.check_fence(claims, request, sub.generation, sub.wake_id)
            if kind == rules.PULL_WAKE and sub.holder is None:
                raise rules.Fenced()
            if not release:
                links = await _links(tx, sub_id)
                await _apply_acks(tx, sub_id, rules.check_acks(links, request.acks))
            if not (release or request.done):
                lease = now + sub.config.lease_ttl_ms / 1000
                await _set(tx, sub_id, lease_until=lease, due_at=None, owner=None, status="active")
                return Outcome()
            await _clear_wake(tx, sub_id)
            cleared = await _load(tx, sub_id)
            assert cleared is not None
            woke = await _issue_wake(tx, cleared, now) is not None
            return Outcome(next_wake=woke, woke=woke)

    async def claim(self, sub_id: str, worker: str, now: float) -> View:
        """7.2: take the pull-wake lease (creating the wake if none is out yet)."""
        async with self.db.transaction() as tx:
            sub = await _live(tx, sub_id)
            if sub.config.kind != rules.PULL_WAKE:
                raise rules.InvalidRequest("subscription is not pull-wake")
            if sub.holder is not None:
                if sub.lease_until is not None and sub.lease_until >= now:
                    raise rules.AlreadyClaimed(sub.holder, sub.generation)
                await _clear_wake(tx, sub_id)  # expired: the old claim token is fenced below
                sub = await _live(tx, sub_id)
            if sub.wake_id is None:
                issued = await _issue_wake(tx, sub, now, deliver=False)
                if issued is None:
                    raise rules.NoPendingWork()
                sub = issued
            links = await _links(tx, sub_id)
            if not rules.has_pending(links):
                await _clear_wake(tx, sub_id)
                raise rules.NoPendingWork()
            await tx.execute(
                "UPDATE relay_subscription_links SET snapshot = coalesce("
                + _TAIL.replace("l.path", "relay_subscription_links.path")
                + ", 0) WHERE subscription_id = ?",
                sub_id,
            )
            lease = now + sub.config.lease_ttl_ms / 1000
            await _set(tx, sub_id, holder=worker, lease_until=lease, due_at=None, owner=None)
            claimed = await _live(tx, sub_id)
            return View(claimed, await _links(tx, sub_id))

    # -- delivery (run by every relay's worker) ---------------------------------------------

    async def take_deliveries(
        self, owner: str, now: float, limit: int, hold: float
    ) -> list[Delivery]:
        """Claim up to ``limit`` due deliveries for ``hold`` seconds. A webhook wake whose
        previous claim ran out is reissued as a new generation: whatever the dead relay may
        have sent is fenced, and the receiver gets a wake it can complete."""
        out: list[Delivery] = []
        due = (
            "FROM relay_subscriptions WHERE deleted_at IS NULL AND due_at IS NOT NULL "
            "AND due_at <= ? AND (owner_until IS NULL OR owner_until < ?)"
        )
        if not await self._any(f"SELECT 1 {due} LIMIT 1", now, now):
            return out  # the usual answer, found without a write lock
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT {_SUB_COLUMNS} {due} ORDER BY due_at LIMIT ? {{skip_locked}}",
                now,
                now,
                limit,
            )
            for row in rows:
                sub = Subscription.from_row(row)
                reissued = sub.owner is not None and sub.config.kind == rules.WEBHOOK
                if reissued:
                    again = await _issue_wake(tx, sub, now)
                    if again is None:
                        await _clear_wake(tx, sub.id)
                        continue
                    sub = again
                await _set(tx, sub.id, owner=owner, owner_until=now + hold)
                view = View(sub, await _links(tx, sub.id))
                out.append(Delivery(view, sub.attempt + 1, reissued))
        return out

    async def delivered(
        self, delivery: Delivery, owner: str, now: float, *, done: bool
    ) -> Outcome | None:
        """A delivery succeeded. ``done`` (a webhook's synchronous ``{"done": true}``) acks
        the snapshot and ends the wake; otherwise the webhook lease starts now. None when the
        wake moved on meanwhile (a callback ended it, the subscription was deleted)."""
        sub_id = delivery.view.sub.id
        async with self.db.transaction() as tx:
            sub = await self._current(tx, delivery, owner)
            if sub is None:
                return None
            if not done:
                lease = now + sub.config.lease_ttl_ms / 1000 if sub.holder is None else None
                values: dict[str, object] = dict(
                    due_at=None, owner=None, owner_until=None, attempt=0, status="active"
                )
                if sub.config.kind == rules.WEBHOOK:
                    values["lease_until"] = lease
                await _set(tx, sub_id, **values)
                return Outcome()
            await _apply_acks(tx, sub_id, rules.snapshot_acks(await _links(tx, sub_id)))
            await _clear_wake(tx, sub_id)
            cleared = await _load(tx, sub_id)
            assert cleared is not None
            woke = await _issue_wake(tx, cleared, now) is not None
            return Outcome(next_wake=woke, woke=woke)

    async def failed(self, delivery: Delivery, owner: str, now: float, delay: float) -> bool:
        """A delivery failed: retry after ``delay``, status ``failed`` until one succeeds."""
        async with self.db.transaction() as tx:
            sub = await self._current(tx, delivery, owner)
            if sub is None:
                return False
            await _set(
                tx, sub.id, due_at=now + delay, owner=None, owner_until=None,
                attempt=delivery.attempt, status="failed",
                lease_until=now + delay + sub.config.lease_ttl_ms / 1000,
            )  # fmt: skip
            return True

    async def release_deliveries(self, owner: str) -> None:
        """On a graceful stop: hand this relay's unfinished deliveries back at once (same
        wake), instead of leaving them until their claim runs out."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE relay_subscriptions SET owner = NULL, owner_until = NULL WHERE owner = ?",
                owner,
            )

    async def _any(self, sql: str, *args: object) -> bool:
        """Whether a read-only probe finds a row: the sweeps look before they lock."""
        async with self.db.transaction(write=False) as tx:
            return bool(await tx.fetch(sql, *args))

    async def _current(self, tx: Tx, delivery: Delivery, owner: str) -> Subscription | None:
        sub = await _load(tx, delivery.view.sub.id)
        if (
            sub is None
            or sub.deleted
            or sub.generation != delivery.view.sub.generation
            or sub.wake_id != delivery.view.sub.wake_id
        ):
            return None
        if sub.owner is not None and sub.owner != owner:
            return None
        return sub

    # -- sweeps ----------------------------------------------------------------------------

    async def expire_leases(self, now: float) -> tuple[int, list[str]]:
        """7.3: clear leases that ran out; wake again where work remains. Returns how many
        expired and which subscriptions were woken."""
        woken: list[str] = []
        expired = (
            "FROM relay_subscriptions WHERE deleted_at IS NULL AND wake_id IS NOT NULL "
            "AND lease_until IS NOT NULL AND lease_until < ? AND due_at IS NULL"
        )
        if not await self._any(f"SELECT 1 {expired} LIMIT 1", now):
            return 0, woken
        async with self.db.transaction() as tx:
            rows = await tx.fetch(f"SELECT {_SUB_COLUMNS} {expired} LIMIT 100 {{skip_locked}}", now)
            for row in rows:
                sub = Subscription.from_row(row)
                await _clear_wake(tx, sub.id)
                cleared = await _load(tx, sub.id)
                assert cleared is not None
                if await _issue_wake(tx, cleared, now) is not None:
                    woken.append(sub.id)
        return len(rows), woken

    async def pending_idle(self) -> list[str]:
        """Idle subscriptions with pending work (a wake the append hook did not issue)."""
        async with self.db.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT DISTINCT sub.id FROM relay_subscriptions sub "
                "JOIN relay_subscription_links l ON l.subscription_id = sub.id "
                "WHERE sub.deleted_at IS NULL AND sub.wake_id IS NULL AND sub.holder IS NULL "
                "AND coalesce(" + _TAIL + ", 0) > l.acked LIMIT 1000"
            )
        return [r[0] for r in rows]

    async def discover(self, horizon: float) -> None:
        """Link streams a pattern matches that appeared since the subscription (or since
        ``horizon``) without this relay's append hook seeing them: all their bytes are new."""
        async with self.db.transaction() as tx:
            subs = await tx.fetch(
                "SELECT id, pattern, created_at FROM relay_subscriptions "
                "WHERE deleted_at IS NULL AND pattern IS NOT NULL"
            )
            for sub_id, pattern, created_at in subs:
                since = max(created_at, horizon)
                for path, _tail in await _matching_streams(tx, pattern, since, sub_id):
                    await _link(tx, sub_id, path, 0, explicit=False)

    async def follow_replaced_streams(self) -> None:
        """A linked stream deleted and created again at its path is a new stream: its cursor
        starts over (the old offsets mean nothing in it). A link made before its stream
        existed adopts the stream that appears, cursor unchanged."""
        current = (
            "(SELECT s.id FROM {streams} s WHERE s.path = relay_subscription_links.path "
            "AND NOT s.soft_deleted)"
        )
        if not await self._any(
            f"SELECT 1 FROM relay_subscription_links WHERE (stream_id IS NOT NULL AND "
            f"{current} <> stream_id) OR (stream_id IS NULL AND {current} IS NOT NULL) LIMIT 1"
        ):
            return
        async with self.db.transaction() as tx:
            await tx.execute(
                f"UPDATE relay_subscription_links SET acked = 0, snapshot = NULL, "
                f"stream_id = {current} WHERE stream_id IS NOT NULL AND {current} <> stream_id"
            )
            await tx.execute(
                f"UPDATE relay_subscription_links SET stream_id = {current} "
                f"WHERE stream_id IS NULL AND {current} IS NOT NULL"
            )

    async def index(self) -> tuple[dict[str, str | None], list[tuple[str, str]]]:
        """Live subscriptions' patterns and every link: the append hook's in-memory filter."""
        async with self.db.transaction(write=False) as tx:
            subs = await tx.fetch(
                "SELECT id, pattern FROM relay_subscriptions WHERE deleted_at IS NULL"
            )
            links = await tx.fetch(
                "SELECT l.subscription_id, l.path FROM relay_subscription_links l "
                "JOIN relay_subscriptions s ON s.id = l.subscription_id "
                "WHERE s.deleted_at IS NULL"
            )
        return {r[0]: r[1] for r in subs}, [(r[0], r[1]) for r in links]

    async def failed_count(self) -> int:
        async with self.db.transaction(write=False) as tx:
            rows = await tx.fetch(
                "SELECT count(*) FROM relay_subscriptions "
                "WHERE deleted_at IS NULL AND status = 'failed'"
            )
        return int(rows[0][0])


async def _matching_streams(
    tx: Tx, pattern: str, since: float | None, unlinked_for: str | None = None
) -> list[tuple[str, int]]:
    """Streams (relative path, tail) the pattern matches, narrowed in SQL by the pattern's
    literal leading segments and, with ``since``, to streams created after it."""
    literal = []
    for segment in pattern.split("/"):
        if segment in ("*", "**"):
            break
        literal.append(segment)
    partial = literal and len(literal) < len(pattern.split("/"))
    prefix = "/".join(literal) + ("/" if partial else "")
    sql = (
        "SELECT s.path, s.tail FROM {streams} s "
        "WHERE NOT s.soft_deleted AND substr(s.path, 1, ?) = ?"
    )
    args: list[object] = [len(prefix), prefix]
    if since is not None:
        sql += " AND s.created_at >= ?"
        args.append(since)
    if unlinked_for is not None:
        sql += (
            " AND NOT EXISTS (SELECT 1 FROM relay_subscription_links l WHERE "
            "l.subscription_id = ? AND l.path = s.path)"
        )
        args.append(unlinked_for)
    matches = compile_glob(pattern)
    out = []
    for path, tail in await tx.fetch(sql, *args):
        if path.split("/", 1)[0] != "__ds" and matches(path):
            out.append((path, int(tail)))
    return out
