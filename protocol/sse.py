"""Server-Sent Events framing for live reads (section 5.8)."""

from __future__ import annotations

import base64

import orjson

from protocol import jsonmode

BASE64 = "base64"


def data_event(payload: bytes, *, json_mode: bool, binary: bool) -> bytes:
    """One ``event: data`` block. Binary streams are base64; JSON streams send an array.

    Every line of the payload gets its own ``data:`` prefix, so a payload with newlines (or a
    JSON array spread over lines) survives the SSE line grammar.
    """
    if binary:
        lines = [base64.b64encode(payload)] if payload else [b""]
    elif json_mode:
        lines = [b"[", *_comma_joined(jsonmode.split_messages(payload)), b"]"]
    else:
        lines = payload.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"event: data\n" + b"".join(_data_line(line) for line in lines) + b"\n"


def _data_line(line: bytes) -> bytes:
    # Readers drop one space after "data:", so a line that starts with a space gets one extra.
    return (b"data: " if line.startswith(b" ") else b"data:") + line + b"\n"


def _comma_joined(messages: list[bytes]) -> list[bytes]:
    return [m + b"," for m in messages[:-1]] + messages[-1:]


def control_event(next_offset: str, *, cursor: str | None, up_to_date: bool, closed: bool) -> bytes:
    """The ``event: control`` block that follows every data event."""
    body: dict[str, object] = {"streamNextOffset": next_offset}
    if cursor is not None and not closed:
        body["streamCursor"] = cursor
    if up_to_date or closed:
        body["upToDate"] = True
    if closed:
        body["streamClosed"] = True
    return b"event: control\ndata:" + orjson.dumps(body) + b"\n\n"


def text_chunk_end(data: bytes) -> int:
    """Where an SSE data event of a text stream may stop, when more bytes follow.

    EventSource decodes each event as UTF-8 and normalizes ``\\r\\n`` to one line break, so the
    cut goes before a trailing incomplete UTF-8 sequence and before a trailing ``\\r`` (whose
    ``\\n`` may come next). If that leaves nothing, the whole of ``data`` goes.
    """
    end = len(data)
    lead = end - 1
    while lead >= max(0, end - 4) and data[lead] & 0xC0 == 0x80:
        lead -= 1  # back over continuation bytes to the sequence's first byte
    if lead >= 0 and data[lead] >= 0xC0:
        need = 2 if data[lead] < 0xE0 else 3 if data[lead] < 0xF0 else 4
        if end - lead < need:
            end = lead
    if end > 1 and data[end - 1] == 0x0D:
        end -= 1  # a lone \r before a cut character goes alone: better than a broken character
    return end or len(data)
