"""The revision convention for JSON token streams (Relay's docs/CORRECTIONS.md).

Bytes at an offset never change, so a correction is a message: a producer appends
``{"type": "revision", "from": i, "delta": "..."}`` (one POST, so the envelope and its
replacement text land together), meaning "drop every token from index ``i`` on, then append
``delta``". Token messages are ``{"type": "token", "i": <index>, "delta": "..."}``. A reader
folds every message it reads, in order, into a :class:`ReplyText`; whether it read live or late,
in whatever chunks, it ends with the same corrected text.
"""

from __future__ import annotations

from typing import Any


def token(index: int, delta: str) -> dict[str, Any]:
    return {"type": "token", "i": index, "delta": delta}


def revision(from_index: int, delta: str) -> dict[str, Any]:
    """Replace the tokens from ``from_index`` on with ``delta`` (the next token is then
    ``from_index + 1``)."""
    return {"type": "revision", "from": from_index, "delta": delta}


class ReplyText:
    """A reader's view of a token stream with revisions applied."""

    def __init__(self) -> None:
        self._parts: list[tuple[int, str]] = []  # (index, text), in index order

    def apply(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "token":
            self._parts.append((int(message["i"]), str(message["delta"])))
        elif kind == "revision":
            start = int(message["from"])
            self._parts = [part for part in self._parts if part[0] < start]
            self._parts.append((start, str(message["delta"])))

    @property
    def text(self) -> str:
        return "".join(text for _, text in self._parts)
