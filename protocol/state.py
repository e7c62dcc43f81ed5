"""State Protocol streams folded into their live rows: the core of compaction (issue 24 §2).

A State Protocol stream holds change messages (``{"type", "key", "value", "headers":
{"operation": "insert" | "update" | "delete"}}``) and control messages (``{"headers":
{"control": "snapshot-start" | "snapshot-end" | "reset"}}``). Folding them by ``(type, key)``
gives what every reader holds after reading them: insert and update set the entity's value
(an update replaces it whole, as readers materialise it), delete drops it, reset drops every
row. A compaction replaces the folded prefix with :func:`snapshot` of the result, so a late
reader downloads the live rows, never the history. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Key = tuple[str, str]
"""An entity: its ``type`` and its ``key``."""

OPERATIONS = frozenset({"insert", "update", "delete"})
CONTROLS = frozenset({"snapshot-start", "snapshot-end", "reset"})


class NotStateProtocol(ValueError):
    """A message that is neither a change nor a control message: a stream holding one cannot
    be folded (compacting it would drop what readers may need)."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"message {index}: {reason}")
        self.index = index
        self.reason = reason


def fold(messages: Iterable[Any], rows: Mapping[Key, Any] | None = None) -> dict[Key, Any]:
    """The live rows after ``messages``, applied in order to ``rows`` (a previous fold, not
    changed). Keys keep the order of their first insert since they were last absent.

    Raises NotStateProtocol for a message that is not a change or a control message.
    """
    live: dict[Key, Any] = dict(rows or {})
    for index, message in enumerate(messages):
        headers = message.get("headers") if isinstance(message, dict) else None
        if not isinstance(headers, dict):
            raise NotStateProtocol(index, "not an object with headers")
        control = headers.get("control")
        if control is not None:
            if control not in CONTROLS:
                raise NotStateProtocol(index, f"unknown control {control!r}")
            if control == "reset":
                live.clear()
            continue
        operation = headers.get("operation")
        if operation not in OPERATIONS:
            raise NotStateProtocol(index, f"unknown operation {operation!r}")
        entity, key = message.get("type"), message.get("key")
        if not isinstance(entity, str) or not entity or not isinstance(key, str) or not key:
            raise NotStateProtocol(index, "a change needs a non-empty string type and key")
        if operation == "delete":
            live.pop((entity, key), None)
        else:
            if "value" not in message:
                raise NotStateProtocol(index, f"an {operation} needs a value")
            live[(entity, key)] = message["value"]
    return live


def snapshot(rows: Mapping[Key, Any]) -> list[dict[str, Any]]:
    """``rows`` as the messages that rebuild them: snapshot-start, one insert per row, and
    snapshot-end (what a compaction appends in place of the history)."""
    inserts = [
        {"type": entity, "key": key, "value": value, "headers": {"operation": "insert"}}
        for (entity, key), value in rows.items()
    ]
    return [
        {"headers": {"control": "snapshot-start"}},
        *inserts,
        {"headers": {"control": "snapshot-end"}},
    ]
