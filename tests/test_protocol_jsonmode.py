"""JSON mode (section 9.1): bodies flatten one array level into messages; reads render arrays."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import jsonmode
from protocol.errors import BadRequest


@pytest.mark.parametrize(
    ("body", "allow_empty", "stored"),
    [
        pytest.param(b'{"a": 1}', False, b'{"a":1}\n', id="one-object"),
        pytest.param(b"[1, 2, 3]", False, b"1\n2\n3\n", id="array-flattens"),
        pytest.param(b"[[1], [2]]", False, b"[1]\n[2]\n", id="only-one-level"),
        pytest.param(b'"a\\nb"', False, b'"a\\nb"\n', id="escaped-newline-stays-escaped"),
        pytest.param(b"[]", True, b"", id="empty-array-on-create"),
        pytest.param(b" null ", False, b"null\n", id="null-is-a-message"),
        pytest.param(
            b"123456789012345678901234567890",
            False,
            b"123456789012345678901234567890\n",
            id="big-integer-exact",
        ),
        pytest.param(b"[1.5e300, 1e-400]", False, b"1.5e+300\n0.0\n", id="big-and-tiny-floats"),
        pytest.param('"\u00e9"'.encode(), False, '"\u00e9"'.encode() + b"\n", id="utf8"),
    ],
)
def test_encode_messages(body: bytes, allow_empty: bool, stored: bytes) -> None:
    assert jsonmode.encode_messages(body, allow_empty=allow_empty) == stored


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param(b"[]", "empty_json_array", id="empty-array-on-append"),
        pytest.param(b"{", "invalid_json", id="truncated"),
        pytest.param(b"", "invalid_json", id="empty"),
        pytest.param(b'"\xff"', "invalid_json", id="invalid-utf8"),
        pytest.param(b"NaN", "invalid_json", id="nan"),
        pytest.param(b"Infinity", "invalid_json", id="infinity"),
        pytest.param(b"{'a': 1}", "invalid_json", id="single-quotes"),
        pytest.param(b"1 2", "invalid_json", id="two-values"),
        pytest.param(b"[1e400]", "invalid_json", id="float-overflow"),
        pytest.param(b"-1E999", "invalid_json", id="negative-overflow"),
    ],
)
def test_invalid_bodies_are_400(body: bytes, code: str) -> None:
    with pytest.raises(BadRequest) as caught:
        jsonmode.encode_messages(body, allow_empty=False)
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("stored", "rendered"),
    [(b"", b"[]"), (b"1\n", b"[1]"), (b'1\n{"a":2}\n"x"\n', b'[1,{"a":2},"x"]')],
)
def test_render(stored: bytes, rendered: bytes) -> None:
    assert jsonmode.render(stored) == rendered


@pytest.mark.parametrize(("count", "prefix"), [(0, 0), (1, 2), (2, 10), (3, 14), (4, None)])
def test_message_prefix(count: int, prefix: int | None) -> None:
    assert jsonmode.message_prefix(b'1\n{"a":2}\n"x"\n', count) == prefix


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(st.lists(json_values, min_size=1, max_size=8), st.integers(min_value=1, max_value=4))
def test_messages_survive_any_chunking_of_appends(messages: list[Any], parts: int) -> None:
    stored = b""
    size = -(-len(messages) // parts)
    for at in range(0, len(messages), size):
        body = json.dumps(messages[at : at + size]).encode()
        stored += jsonmode.encode_messages(body, allow_empty=False)
    assert json.loads(jsonmode.render(stored)) == messages
    assert [json.loads(m) for m in jsonmode.split_messages(stored)] == messages
    for count in range(len(messages) + 1):
        cut = jsonmode.message_prefix(stored, count)
        assert cut is not None
        assert json.loads(jsonmode.render(stored[cut:])) == messages[count:]


@pytest.mark.parametrize(
    ("data", "limit", "end"),
    [
        pytest.param(b"", 4, 0, id="nothing"),
        pytest.param(b"1\n2\n", 4, 4, id="all-fits"),
        pytest.param(b"1\n2\n", 100, 4, id="all-under-limit"),
        pytest.param(b"1\n2\n3\n", 4, 4, id="cut-at-last-boundary-within-limit"),
        pytest.param(b"1\n22\n3\n", 4, 2, id="never-mid-message"),
        pytest.param(b"1\n22\n3\n", 5, 5, id="boundary-exactly-at-limit"),
        pytest.param(b"12345\n6\n", 2, 6, id="first-message-over-limit-goes-whole"),
        pytest.param(b"12345", 2, 0, id="first-message-not-whole-yet"),
        pytest.param(b"1\n234", 100, 2, id="partial-message-at-the-end-is-dropped"),
    ],
)
def test_chunk_end(data: bytes, limit: int, end: int) -> None:
    assert jsonmode.chunk_end(data, limit) == end


@given(st.lists(st.integers(min_value=0, max_value=10**12), max_size=30), st.integers(1, 40))
def test_chunked_reads_reassemble_whole_messages(messages: list[int], limit: int) -> None:
    stored = b"".join(str(m).encode() + jsonmode.SEPARATOR for m in messages)
    out: list[int] = []
    at = 0
    while at < len(stored):
        end = jsonmode.chunk_end(stored[at:], limit)
        assert end > 0
        out += json.loads(jsonmode.render(stored[at : at + end]))
        at += end
    assert out == messages
