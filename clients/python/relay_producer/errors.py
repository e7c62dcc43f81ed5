"""Typed errors for the 4xx answers a producer can get, so callers branch on type, not text."""

from __future__ import annotations

import json
from collections.abc import Mapping


class ProducerError(Exception):
    """A request the server refused; ``status`` and ``body`` are its answer."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


class InvalidRequest(ProducerError):
    """400: the server found the request malformed (a bad path, header or JSON body); the
    body says which. Retrying it unchanged cannot succeed."""


class PayloadTooLarge(ProducerError):
    """413: one POST was over the server's body limit; send smaller batches (a shorter
    ``linger`` or smaller tokens)."""


class StreamNotFound(ProducerError):
    """404: the stream does not exist (and the producer was told not to create it)."""


class StreamClosed(ProducerError):
    """409 with Stream-Closed: the stream no longer accepts appends."""


class ContentTypeMismatch(ProducerError):
    """409: the stream exists with another content type."""


class SequenceGap(ProducerError):
    """409: the server expected another Producer-Seq (state lost on one side)."""


class ProducerFenced(ProducerError):
    """403: a newer epoch of this producer id took over; this instance must stop."""

    def __init__(self, status: int, body: str, current_epoch: int | None) -> None:
        super().__init__(status, body)
        self.current_epoch = current_epoch


def error_for(status: int, headers: Mapping[str, str], text: str) -> ProducerError:
    """The typed error for a refused request, from its status and the headers that tell
    409s apart."""
    if status == 400:
        return InvalidRequest(status, text)
    if status == 404:
        return StreamNotFound(status, text)
    if status == 413:
        return PayloadTooLarge(status, text)
    if status == 403 and "Producer-Epoch" in headers:
        try:
            current: int | None = int(headers["Producer-Epoch"])
        except ValueError:
            current = None
        return ProducerFenced(status, text, current)
    if status == 409:
        if headers.get("Stream-Closed", "").lower() == "true":
            return StreamClosed(status, text)
        if "Producer-Expected-Seq" in headers:
            return SequenceGap(status, text)
        if _code(text) in (None, "content_type_mismatch", "stream_exists"):
            return ContentTypeMismatch(status, text)  # what a create or append 409 means
    return ProducerError(status, text)  # Relay's other conflicts (forks, retention) by code


def _code(text: str) -> str | None:
    """Relay's error code (``{"error": {"code": ...}}``), or None from another server."""
    try:
        body = json.loads(text)
        code = body["error"]["code"]
    except (ValueError, TypeError, KeyError):
        return None
    return code if isinstance(code, str) else None
