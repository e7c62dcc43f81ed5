"""What the hub holds per stream stays bounded by bytes, not by how many appends made them:
a stream of tiny tokens is held in few entries, and reading what is held walks few."""

from __future__ import annotations

from relay.hub import COALESCE_BYTES, RECENT_BYTES, Hub


def test_tiny_appends_are_held_in_few_entries() -> None:
    hub = Hub()
    token = b"token "
    position = 0
    for _ in range(200_000):  # 1.2 MB of 6-byte tokens: past the per-stream cap
        hub.publish(1, position, token, position + len(token), False)
        position += len(token)
    held = hub._held[1]
    assert held.size <= RECENT_BYTES
    assert len(held.chunks) <= RECENT_BYTES // COALESCE_BYTES + 2
    start = position - held.size
    assert hub.held(1, start, position) == token * (held.size // len(token))


def test_an_append_bigger_than_the_join_size_stays_whole() -> None:
    hub = Hub()
    big = b"x" * (COALESCE_BYTES + 1)
    hub.publish(1, 0, b"a", 1, False)
    hub.publish(1, 1, big, 1 + len(big), False)
    hub.publish(1, 1 + len(big), b"b", 2 + len(big), False)
    assert [len(data) for _, data in hub._held[1].chunks] == [1, len(big), 1]
    assert hub.held(1, 0, 2 + len(big)) == b"a" + big + b"b"
