"""``relay/http/wire.py``: the bytes of an answer written without aiohttp (parked readers)."""

from __future__ import annotations

import pytest

from relay.http.wire import Answer, encode


def parse(data: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, [(k, v) for k, _, v in (line.partition(": ") for line in lines)], body


def test_a_200_carries_its_length_date_and_body() -> None:
    status, headers, body = parse(encode(Answer(200, {"Content-Type": "text/plain"}, b"hello")))
    assert status == "HTTP/1.1 200 OK"
    names = [name for name, _ in headers]
    assert names == ["Date", "Content-Type", "Content-Length"]
    assert dict(headers)["Content-Length"] == "5" and dict(headers)["Date"].endswith(" GMT")
    assert body == b"hello"


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_answers_carry_no_length_and_no_body(status: int) -> None:
    data = encode(Answer(status, {"ETag": '"1:0:2"'}, b"ignored"))
    line, headers, body = parse(data)
    assert line.startswith(f"HTTP/1.1 {status} ")
    assert "Content-Length" not in dict(headers) and body == b""


def test_close_says_so_and_head_only_leaves_the_body_out() -> None:
    data = encode(Answer(200, {}, b"abc"), close=True, head_only=True)
    _, headers, body = parse(data)
    assert dict(headers)["Connection"] == "close" and dict(headers)["Content-Length"] == "3"
    assert body == b""


@pytest.mark.parametrize("value", ["a\r\nSet-Cookie: x=1", "a\nb", "a\rb"])
def test_a_value_with_a_line_break_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="line break"):
        encode(Answer(200, {"Stream-Cursor": value}, b""))


def test_an_unknown_status_still_has_a_reason() -> None:
    assert encode(Answer(599, {})).startswith(b"HTTP/1.1 599 Unknown\r\n")
