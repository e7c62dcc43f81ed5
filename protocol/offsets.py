"""Offsets: opaque to clients, a byte position to us.

An offset is the stream's logical byte position after the last byte a reader has, written as
``<16 digits>_<16 digits>``: a reserved epoch (always zero today) and the position, both
zero-padded. Fixed width makes lexicographic order equal numeric order, so clients may compare
offsets as strings (PROTOCOL.md section 8). Forks share the source's offset space, which a plain
position gives for free. The shape matches the reference server's, so the zero offset that
clients and the official suite spell out (``0000000000000000_0000000000000000``) means the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import BadRequest

WIDTH = 16
MAX_POSITION = 10**WIDTH - 1
EPOCH = "0" * WIDTH
TOKEN_LENGTH = 2 * WIDTH + 1
BEGINNING = "-1"
NOW = "now"


def format_offset(position: int) -> str:
    """Render a byte position as an offset token."""
    if not 0 <= position <= MAX_POSITION:
        raise ValueError(f"position out of range: {position}")
    return f"{EPOCH}_{position:0{WIDTH}d}"


def parse_offset(token: str) -> int:
    """Parse an offset minted by :func:`format_offset`; anything else is a 400."""
    epoch, sep, position = token.partition("_")
    if (
        len(token) != TOKEN_LENGTH
        or sep != "_"
        or epoch != EPOCH
        or not position.isascii()
        or not position.isdigit()
    ):
        raise BadRequest("invalid_offset", f"malformed offset {token[:64]!r}")
    return int(position)


@dataclass(frozen=True, slots=True)
class ReadStart:
    """Where a read begins: a position, the stream's start, or its tail (``now``)."""

    position: int | None  # None means "the tail at the time of reading"
    beginning: bool = False  # ``-1`` (or no offset): wherever the stream's retained data starts

    @property
    def is_now(self) -> bool:
        return self.position is None


def parse_read_offset(raw: str | None) -> ReadStart:
    """Parse the ``offset`` query parameter, including the ``-1`` and ``now`` sentinels."""
    if raw is None or raw == BEGINNING:
        return ReadStart(0, beginning=True)
    if raw == NOW:
        return ReadStart(None)
    return ReadStart(parse_offset(raw))
