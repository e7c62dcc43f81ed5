"""Where a commit becomes a wake: what the relay does once the store has committed.

The store's committer hands every committed append here, a create's body included (before any
handler resumes, and whether or not its client is still there), and the Postgres LISTEN
connection hands over what other relays committed. From here the hub wakes parked readers and
keeps the new bytes, metrics count them, and subscriptions learn which linked streams moved.
Nothing else publishes commits, so a handler only awaits its result and renders it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from relay.hub import Hub
from relay.store.base import AppendResult

if TYPE_CHECKING:
    from relay.metrics import Metrics
    from relay.subscriptions.service import Subscriptions


class CommitSink:
    """The store's listener (:class:`relay.store.base.StoreEvents`) for one relay process."""

    def __init__(self, hub: Hub, metrics: Metrics, subscriptions: Subscriptions | None) -> None:
        self._hub = hub
        self._appended_bytes = metrics.appended_bytes
        self._subscriptions = subscriptions

    def appended(self, path: str, result: AppendResult) -> None:
        meta, data = result.meta, result.plan.data
        self._hub.publish(meta.stream_id, result.start, data, meta.tail, meta.closed)
        if data:
            self._appended_bytes.inc(len(data))
            if self._subscriptions is not None:
                self._subscriptions.on_append(path, result.start)

    def remote_commit(self, stream_id: int, tail: int, closed: bool) -> None:
        self._hub.remote_commit(stream_id, tail, closed)

    def deleted(self, stream_id: int) -> None:
        self._hub.deleted(stream_id)

    def watched_ids(self) -> Iterable[int]:
        return self._hub.watched_ids()

    def forget_held(self) -> None:
        self._hub.forget_held()
