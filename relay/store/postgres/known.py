"""What a relay knows about streams without asking the database.

``Known`` answers reads (kept by this relay's commits and other relays' NOTIFYs; trusted only
while LISTEN is up and after the shared barrier, see ``PostgresStore._known_fresh``).
``OwnedStreams`` lets a batch skip the locks (streams this relay wrote last, as it wrote them,
with the producer states it knows); the guarded write checks it in the database.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from protocol.model import ProducerState, StreamMeta


@dataclass(frozen=True, slots=True)
class Owned:
    """A stream exactly as this relay's last commit to it left it, and the producer states it
    knows for it (``complete``: no other producer has state, as for a stream it created)."""

    meta: StreamMeta
    producers: dict[str, ProducerState | None]
    complete: bool = False

    def producer(self, producer_id: str) -> tuple[bool, ProducerState | None]:
        """(known, state) of one producer."""
        if producer_id in self.producers:
            return True, self.producers[producer_id]
        return self.complete, None


class OwnedStreams:
    """What lets a batch skip the locks: streams this relay wrote last, as it wrote them.

    Only a guess: the guarded write checks every tail it relies on in the database. Another
    relay's commit (its NOTIFY), a removal or a failed guard drops an entry.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.by_path: dict[str, Owned] = {}
        self._paths: dict[int, str] = {}
        self._limit = limit

    def put(self, owned: Owned) -> None:
        if len(self.by_path) >= self._limit and owned.meta.path not in self.by_path:
            self.clear()
        self.by_path[owned.meta.path] = owned
        self._paths[owned.meta.stream_id] = owned.meta.path

    def drop(self, stream_id: int) -> None:
        path = self._paths.pop(stream_id, None)
        if path is not None:
            owned = self.by_path.get(path)
            if owned is not None and owned.meta.stream_id == stream_id:
                del self.by_path[path]

    def drop_path(self, path: str) -> None:
        owned = self.by_path.pop(path, None)
        if owned is not None:
            self._paths.pop(owned.meta.stream_id, None)

    def clear(self) -> None:
        self.by_path.clear()
        self._paths.clear()


class Known:
    """Streams as of the last commit or notification this relay saw: never fresher than the
    database, but any later commit reaches it (local commits, NOTIFY) while LISTEN is up.

    A view taken before some notification was heard (a lookup's row, a local batch's result)
    may arrive after it: :meth:`put` takes the :meth:`mark` read when that view was taken and
    merges every notification heard since, so an entry is never older than what this relay
    has heard. Notifications are kept for that in ``_heard`` (bounded, oldest dropped first);
    a view older than a dropped one is not kept at all.
    """

    def __init__(self, limit: int = 100_000, heard_limit: int = 10_000) -> None:
        self.by_path: dict[str, StreamMeta] = {}
        self._paths: dict[int, str] = {}
        self._gone: set[int] = set()  # removed ids: a lookup that began earlier must not revive one
        self._limit = limit
        # Recent notifications, id -> (tail, closed, sequence), oldest first.
        self._heard: dict[int, tuple[int, bool, int]] = {}
        self._heard_limit = heard_limit
        self._seq = 0  # notifications heard so far
        self._forgotten = 0  # sequence of the newest notification no longer in _heard

    def mark(self) -> int:
        """Where the notifications stand now: pass it to :meth:`put` with a view taken after."""
        return self._seq

    def put(self, meta: StreamMeta, since: int | None = None) -> None:
        """Keep ``meta``, a view taken after :meth:`mark` returned ``since`` (None: a view no
        older than every notification heard so far)."""
        if meta.stream_id in self._gone:
            return
        if since is not None:
            if since < self._forgotten:
                return  # a notification it may predate is no longer here to merge
            heard = self._heard.get(meta.stream_id)
            if heard is not None and heard[2] > since:
                tail, closed, _ = heard
                if tail > meta.tail or closed > meta.closed:
                    meta = replace(meta, tail=max(tail, meta.tail), closed=closed or meta.closed)
        known = self.by_path.get(meta.path)
        if known is not None and known.stream_id > meta.stream_id:
            return  # a lookup that began before the path was re-created
        if known is not None and known.stream_id == meta.stream_id:
            # Tails only grow and closing is final: keep whichever view saw more.
            if known.tail > meta.tail or known.closed > meta.closed:
                closed = known.closed or meta.closed
                meta = replace(meta, tail=max(known.tail, meta.tail), closed=closed)
        elif len(self.by_path) >= self._limit:
            self.clear()
        self.by_path[meta.path] = meta
        self._paths[meta.stream_id] = meta.path

    def moved(self, stream_id: int, tail: int, closed: bool) -> None:
        self._seq += 1
        heard = self._heard.pop(stream_id, None)  # re-inserted last: the newest
        if heard is not None:
            tail, closed = max(tail, heard[0]), closed or heard[1]
        elif len(self._heard) >= self._heard_limit:
            oldest = next(iter(self._heard))
            self._forgotten = self._heard.pop(oldest)[2]
        self._heard[stream_id] = (tail, closed, self._seq)
        path = self._paths.get(stream_id)
        known = self.by_path.get(path) if path is not None else None
        if known is not None and known.stream_id == stream_id:
            self.by_path[known.path] = replace(
                known, tail=max(known.tail, tail), closed=known.closed or closed
            )

    def removed(self, stream_id: int) -> None:
        if len(self._gone) >= self._limit:
            self.clear()
        self._gone.add(stream_id)
        path = self._paths.pop(stream_id, None)
        known = self.by_path.get(path) if path is not None else None
        if known is not None and known.stream_id == stream_id:
            del self.by_path[known.path]

    def clear(self) -> None:
        """Forget everything, and refuse every view taken before (see :meth:`put`)."""
        self.by_path.clear()
        self._paths.clear()
        self._gone.clear()
        self._heard.clear()
        self._seq += 1
        self._forgotten = self._seq
