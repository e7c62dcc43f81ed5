"""An answer as data (status, headers, body), and its HTTP/1.1 bytes.

Handlers build an ``Answer``; ``response`` makes it an aiohttp ``web.Response`` for the usual
path, and ``encode`` writes the bytes themselves for a connection aiohttp no longer holds (a
parked long-poll reader, ``relay.http.parked``), without a ``web.Response`` or aiohttp's header
serialisation per delivery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus

from aiohttp import web

NO_BODY = frozenset({204, 304})
"""Answers that carry no body and no Content-Length (RFC 9110 8.6, 15.3.5, 15.4.5)."""


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes | None = None

    def response(self) -> web.Response:
        return web.Response(status=self.status, headers=self.headers, body=self.body)


_REASONS = {status.value: status.phrase for status in HTTPStatus}


class _Date:
    """The Date header's value, formatted at most once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def __call__(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True)
        return self._value


http_date = _Date()


def encode(answer: Answer, *, head_only: bool = False, close: bool = False) -> bytes:
    """The answer's HTTP/1.1 bytes. A header value holding a line break is refused (the same
    refusal aiohttp makes): no value may add a header or end the head early."""
    status = answer.status
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"Date: {http_date()}"]
    lines += [f"{name}: {value}" for name, value in answer.headers.items()]
    body = answer.body or b""
    if status not in NO_BODY:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    text = "\r\n".join(lines)
    breaks = len(lines) - 1  # one check of the whole head, not one per value
    if text.count("\n") != breaks or text.count("\r") != breaks:
        raise ValueError("a header line holds a line break")
    head = (text + "\r\n\r\n").encode()
    if head_only or status in NO_BODY:
        return head
    return head + body
