"""Deadlines for many parked things at once, with one event-loop timer per tick, not per thing.

Tens of thousands of parked long-poll readers each wait for a deadline (the long-poll timeout,
a credential re-check). A loop timer each costs a ``TimerHandle`` and a heap entry, and
cancelling one when its reader is woken early leaves the entry in the loop's heap until its
time comes. Here deadlines are rounded up to the next ``tick`` (so a deadline fires at most a
tick late, never early) and kept in a set per tick: adding and removing are a set operation,
and a tick's timer is armed once, for all that fall due in it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol

TICK_SECONDS = 0.05


class Due(Protocol):
    """Something with a deadline: ``due`` is called once, at or just after it."""

    def due(self) -> None: ...


class Deadlines:
    """Deadlines by tick on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = TICK_SECONDS) -> None:
        self._loop = loop
        self._tick = tick
        self._slots: dict[int, set[Due]] = {}

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())

    @property
    def armed(self) -> int:
        """Loop timers armed: one per tick with something due in it."""
        return len(self._slots)

    def add(self, when: float, item: Due) -> int:
        """Call ``item.due()`` at loop time ``when`` (at most a tick later); the key to
        ``discard`` it with."""
        key = math.ceil(when / self._tick)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            self._loop.call_at(key * self._tick, self._fire, key)
        slot.add(item)
        return key

    def discard(self, key: int, item: Due) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.discard(item)

    def _fire(self, key: int) -> None:
        for item in self._slots.pop(key, ()):
            item.due()
