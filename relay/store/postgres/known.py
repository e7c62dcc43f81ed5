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
    database, but any later commit reaches it (local commits, NOTIFY) while LISTEN is up."""

    def __init__(self, limit: int = 100_000) -> None:
        self.by_path: dict[str, StreamMeta] = {}
        self._paths: dict[int, str] = {}
        self._gone: set[int] = set()  # removed ids: a lookup that began earlier must not revive one
        self._limit = limit

    def put(self, meta: StreamMeta) -> None:
        if meta.stream_id in self._gone:
            return
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
        self.by_path.clear()
        self._paths.clear()
        self._gone.clear()
