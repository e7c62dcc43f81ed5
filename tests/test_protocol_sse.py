"""SSE framing (section 5.8): data events survive the line grammar; control events carry the
offset, cursor and flags; binary streams are base64."""

from __future__ import annotations

import base64
import json
from typing import TypedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import sse


class Control(TypedDict):
    """``control_event``'s keyword arguments, as the table below gives them."""

    cursor: str | None
    up_to_date: bool
    closed: bool


def parse(block: bytes) -> tuple[str, str]:
    """Decode one event block the way an EventSource does."""
    event, data = "message", []
    for line in block.decode().split("\n"):
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    return event, "\n".join(data)


@pytest.mark.parametrize(
    ("payload", "json_mode", "binary", "expected"),
    [
        pytest.param(b"hello", False, False, "hello", id="text"),
        pytest.param(b"a\nb", False, False, "a\nb", id="multi-line"),
        pytest.param(b"a\r\nb\rc", False, False, "a\nb\nc", id="crlf-normalized"),
        pytest.param(b" leading", False, False, " leading", id="leading-space-kept"),
        pytest.param(b"", False, False, "", id="empty"),
        pytest.param(b'1\n{"a":2}\n', True, False, '[\n1,\n{"a":2}\n]', id="json-array"),
        pytest.param(
            b"\x00\xff", False, True, base64.b64encode(b"\x00\xff").decode(), id="binary-base64"
        ),
    ],
)
def test_data_events(payload: bytes, json_mode: bool, binary: bool, expected: str) -> None:
    block = sse.data_event(payload, json_mode=json_mode, binary=binary)
    assert block.endswith(b"\n\n")
    assert parse(block) == ("data", expected)


@pytest.mark.parametrize(
    ("kwargs", "body"),
    [
        pytest.param(
            {"cursor": "7", "up_to_date": False, "closed": False},
            {"streamNextOffset": "o", "streamCursor": "7"},
            id="catching-up",
        ),
        pytest.param(
            {"cursor": "7", "up_to_date": True, "closed": False},
            {"streamNextOffset": "o", "streamCursor": "7", "upToDate": True},
            id="up-to-date",
        ),
        pytest.param(
            {"cursor": "7", "up_to_date": True, "closed": True},
            {"streamNextOffset": "o", "upToDate": True, "streamClosed": True},
            id="closed-has-no-cursor",
        ),
        pytest.param(
            {"cursor": None, "up_to_date": False, "closed": True},
            {"streamNextOffset": "o", "upToDate": True, "streamClosed": True},
            id="closed-implies-up-to-date",
        ),
    ],
)
def test_control_events(kwargs: Control, body: dict[str, object]) -> None:
    event, data = parse(sse.control_event("o", **kwargs))
    assert event == "control"
    assert json.loads(data) == body


@given(st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r")))
def test_any_text_round_trips(text: str) -> None:
    block = sse.data_event(text.encode(), json_mode=False, binary=False)
    assert parse(block) == ("data", text)


@given(st.binary())
def test_any_bytes_round_trip_as_base64(payload: bytes) -> None:
    _, data = parse(sse.data_event(payload, json_mode=False, binary=True))
    assert base64.b64decode(data) == payload


@pytest.mark.parametrize(
    ("data", "end"),
    [
        pytest.param(b"abc", 3, id="ascii"),
        pytest.param("aé".encode(), 3, id="whole-two-byte"),
        pytest.param("aé".encode()[:2], 1, id="cut-before-half-two-byte"),
        pytest.param("a✓".encode()[:3], 1, id="cut-before-two-thirds"),
        pytest.param("a𝄞".encode()[:4], 1, id="cut-before-three-quarters"),
        pytest.param("a𝄞".encode(), 5, id="whole-four-byte"),
        pytest.param(b"a\r", 1, id="cut-before-cr"),
        pytest.param(b"a\r\n", 3, id="crlf-whole"),
        pytest.param("é".encode()[:1], 1, id="nothing-left-sends-all"),
        pytest.param(b"\r", 1, id="lone-cr-sends-all"),
        pytest.param("\r𐀀".encode()[:4], 1, id="cr-before-cut-character-goes-alone"),
    ],
)
def test_text_chunk_end(data: bytes, end: int) -> None:
    assert sse.text_chunk_end(data) == end


@given(st.text(min_size=1), st.integers(4, 12))  # a chunk holds at least one character
def test_text_events_cut_anywhere_reassemble(text: str, limit: int) -> None:
    stored = text.encode()
    out, at = "", 0
    while at < len(stored):
        piece = stored[at : at + limit]
        if at + len(piece) < len(stored):
            piece = piece[: sse.text_chunk_end(piece)]
        if at + len(piece) < len(stored):
            piece.decode()  # a cut mid-character would raise
        out += parse(sse.data_event(piece, json_mode=False, binary=False))[1]
        at += len(piece)
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    assert out == normalized
