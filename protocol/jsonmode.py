"""JSON mode (section 9.1): validate and flatten appended bodies, render reads as arrays.

Stored form: each message as compact JSON followed by ``\\n``. Compact JSON never contains a raw
newline (strings escape it), so message boundaries are newlines, a read renders as
``[`` + messages joined by ``,`` + ``]``, and a fork sub-offset of N messages is N newlines.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

from protocol.errors import BadRequest

SEPARATOR = b"\n"
_BIG_NUMBER = re.compile(rb"[0-9]{19}|[eE][+-]?[0-9]{3}")  # see _loads
EMPTY_ARRAY = b"[]"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text} is out of range")
    return value


def _loads(body: bytes) -> Any:
    # orjson turns integers beyond 64 bits into floats (losing digits) and overflowing floats
    # into infinity (later written as null). Bodies that may hold such a number go to the
    # standard library, which keeps integers exact and lets us refuse what overflows.
    if not _BIG_NUMBER.search(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        text = body.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("invalid_json", "body is not valid UTF-8 JSON") from None


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()


def encode_messages(body: bytes, *, allow_empty: bool) -> bytes:
    """Turn a POST or PUT body into stored messages, flattening one level of array.

    ``allow_empty`` is True for PUT (``[]`` creates an empty stream) and False for POST
    (an empty array is a 400).
    """
    value = _loads(body)
    messages = value if isinstance(value, list) else [value]
    if not messages and not allow_empty:
        raise BadRequest("empty_json_array", "an empty JSON array appends nothing")
    return b"".join(_dumps(m) + SEPARATOR for m in messages)


def render(stored: bytes) -> bytes:
    """Stored messages as the JSON array a GET returns."""
    if not stored:
        return EMPTY_ARRAY
    return b"[" + stored[:-1].replace(SEPARATOR, b",") + b"]"


def message_prefix(stored: bytes, count: int) -> int | None:
    """Byte length of the first ``count`` messages, or None if there are fewer."""
    end = 0
    for _ in range(count):
        cut = stored.find(SEPARATOR, end)
        if cut < 0:
            return None
        end = cut + 1
    return end


def split_messages(stored: bytes) -> list[bytes]:
    """Each stored message's JSON text (used by SSE to frame arrays line by line)."""
    return stored.split(SEPARATOR)[:-1] if stored else []


def chunk_end(data: bytes, limit: int) -> int:
    """Where a read of ``data``, which starts on a message boundary, may stop: every read path
    cuts here so no response or event ever carries half a message.

    The last boundary within ``limit`` bytes; when the first message alone is longer than
    ``limit``, the end of that message (it goes whole); 0 when ``data`` holds no whole message
    yet, so the caller must read further.
    """
    last = data.rfind(SEPARATOR, 0, limit) + 1
    if last:
        return last
    return data.find(SEPARATOR, limit) + 1
