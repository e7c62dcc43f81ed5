"""Live-read cursors (section 10.1): interval numbers that never go backwards.

Time is cut into 20 s intervals counted from 2024-10-09T00:00:00Z. A client echoing a cursor at
or past the current interval gets one strictly greater (jittered), so CDN cache keys advance.
"""

from __future__ import annotations

EPOCH = 1728432000.0  # 2024-10-09T00:00:00Z
INTERVAL_SECONDS = 20


def interval(now: float) -> int:
    return int((now - EPOCH) // INTERVAL_SECONDS)


def next_cursor(now: float, client_cursor: str | None, jitter_seconds: int) -> str:
    """The cursor to return. ``jitter_seconds`` (1..3600) comes from the caller's RNG."""
    current = interval(now)
    if client_cursor is not None and client_cursor.isdigit() and len(client_cursor) < 19:
        echoed = int(client_cursor)
        if echoed >= current:
            bump = max(1, -(-jitter_seconds // INTERVAL_SECONDS))
            return str(echoed + bump)
    return str(current)
