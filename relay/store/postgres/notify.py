"""What a commit tells other relays: one NOTIFY per batch on :data:`CHANNEL`, listing each
moved stream's commit record (:func:`notify_payload`); :func:`parse_payload` reads it back."""

from __future__ import annotations

from collections.abc import Iterator

from relay.store.engine.plan import Batch

CHANNEL = "relay_commits"
NOTIFY_LIMIT = 7900  # Postgres caps a payload at 8000 bytes


def parse_payload(body: str) -> Iterator[tuple[int, int, str]]:
    for entry in body.split(","):
        parts = entry.split(":")
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            yield int(parts[0]), int(parts[1]), parts[2]


def notify_payload(origin: str, state: Batch) -> str:
    """``origin|id:tail:flag,...``; flag 0 open, 1 closed, d removed, r horizon moved; ``*``:
    re-check all."""
    entries = [f"{sid}:{tail}:{int(closed)}" for sid, (tail, closed) in state.moved.items()]
    entries += [f"{sid}:0:d" for sid in state.removed]
    entries += [f"{sid}:0:r" for sid in state.retained]
    text = f"{origin}|" + ",".join(entries)
    return text if len(text) <= NOTIFY_LIMIT else f"{origin}|*"
