"""Offsets (section 8): fixed width, ordered as strings, never a sentinel, strictly parsed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import BadRequest
from protocol.offsets import MAX_POSITION, format_offset, parse_offset, parse_read_offset

ZERO = "0000000000000000_0000000000000000"


@pytest.mark.parametrize(
    ("position", "token"),
    [
        pytest.param(0, ZERO, id="zero-matches-reference-server"),
        pytest.param(1, "0000000000000000_0000000000000001", id="one"),
        pytest.param(1234567, "0000000000000000_0000000001234567", id="padded"),
        pytest.param(MAX_POSITION, "0000000000000000_9999999999999999", id="max"),
    ],
)
def test_format_and_parse_are_inverse(position: int, token: str) -> None:
    assert format_offset(position) == token
    assert parse_offset(token) == position


@pytest.mark.parametrize("position", [-1, MAX_POSITION + 1])
def test_positions_out_of_range_cannot_be_formatted(position: int) -> None:
    with pytest.raises(ValueError):
        format_offset(position)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("", id="empty"),
        pytest.param("-1", id="sentinel-beginning"),
        pytest.param("now", id="sentinel-now"),
        pytest.param("0000000000000000-0000000000000001", id="wrong-separator"),
        pytest.param("0000000000000001_0000000000000001", id="unknown-epoch"),
        pytest.param("0000000000000000_000000000000001", id="short"),
        pytest.param("0000000000000000_00000000000000001", id="long"),
        pytest.param("0000000000000000_00000000000000x1", id="letter"),
        pytest.param("0000000000000000_-000000000000001", id="sign"),
        pytest.param("0000000000000000_\u0661\u0662" + "0" * 14, id="unicode-digits"),
        pytest.param("0000000000000000_+000000000000001", id="plus"),
    ],
)
def test_malformed_tokens_are_400(token: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_offset(token)
    assert caught.value.code == "invalid_offset"


@pytest.mark.parametrize(
    ("raw", "position", "is_now"),
    [
        pytest.param(None, 0, False, id="absent-means-start"),
        pytest.param("-1", 0, False, id="minus-one-means-start"),
        pytest.param("now", None, True, id="now-means-tail"),
        pytest.param(ZERO, 0, False, id="zero-token"),
        pytest.param("0000000000000000_0000000000000042", 42, False, id="token"),
    ],
)
def test_read_offsets_accept_the_sentinels(
    raw: str | None, position: int | None, is_now: bool
) -> None:
    start = parse_read_offset(raw)
    assert start.position == position
    assert start.is_now is is_now


@pytest.mark.parametrize("raw", ["-2", "NOW", "Now", "1", "latest", " -1"])
def test_other_read_offsets_are_400(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_read_offset(raw)


positions = st.integers(min_value=0, max_value=MAX_POSITION)


@given(positions, positions)
def test_string_order_is_position_order(a: int, b: int) -> None:
    assert (format_offset(a) < format_offset(b)) == (a < b)
    assert (format_offset(a) == format_offset(b)) == (a == b)


@given(positions)
def test_every_formatted_offset_parses_back_and_is_never_a_sentinel(position: int) -> None:
    token = format_offset(position)
    assert parse_offset(token) == position
    assert token not in ("-1", "now")
    assert len(token) == len(ZERO)
