"""What a Postgres relay knows of streams: a view taken before a notification was heard never
leaves the cache older than that notification."""

from __future__ import annotations

from protocol.model import StreamMeta
from relay.store.postgres.known import Known


def meta(tail: int, stream_id: int = 7, closed: bool = False) -> StreamMeta:
    return StreamMeta(stream_id, "chat", "text/plain", tail, closed=closed)


def test_a_lookup_that_overlapped_a_commit_keeps_the_commits_tail() -> None:
    known = Known()
    since = known.mark()  # the lookup's query begins; the row it reads has tail 0
    known.moved(7, 5, False)  # another relay's commit is heard before the row arrives
    known.put(meta(0), since)
    assert known.by_path["chat"].tail == 5


def test_a_close_heard_during_a_lookup_is_kept() -> None:
    known = Known()
    since = known.mark()
    known.moved(7, 3, True)
    known.put(meta(3), since)
    assert known.by_path["chat"].closed


def test_notifications_heard_before_the_view_do_not_apply_to_it() -> None:
    """They are in the view already (or the stream moved on), and must not resurrect an old
    tail over a re-read view: the merge is by maximum, so an older one could only be a no-op."""
    known = Known()
    known.moved(7, 5, False)
    since = known.mark()
    known.put(meta(9), since)
    assert known.by_path["chat"].tail == 9


def test_a_view_older_than_a_dropped_notification_is_not_kept() -> None:
    known = Known(heard_limit=2)
    since = known.mark()
    known.moved(7, 5, False)  # dropped when the next two arrive
    known.moved(8, 1, False)
    known.moved(9, 1, False)
    known.put(meta(0), since)
    assert "chat" not in known.by_path  # the database answers the next read instead
    later = known.mark()
    known.put(meta(5), later)
    assert known.by_path["chat"].tail == 5


def test_a_view_from_before_a_clear_is_not_kept() -> None:
    """After LISTEN was lost, notifications were missed: nothing read before counts."""
    known = Known()
    since = known.mark()
    known.clear()
    known.put(meta(0), since)
    assert known.by_path == {}


def test_a_removal_heard_during_a_lookup_wins() -> None:
    known = Known()
    since = known.mark()
    known.removed(7)
    known.put(meta(4), since)
    assert known.by_path == {}


def test_moves_of_a_known_stream_apply_at_once() -> None:
    known = Known()
    known.put(meta(1))
    known.moved(7, 4, False)
    assert known.by_path["chat"].tail == 4
