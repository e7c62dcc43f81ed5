"""Typed errors for the 4xx answers a producer can get, so callers branch on type, not text."""

from __future__ import annotations


class ProducerError(Exception):
    """A request the server refused; ``status`` and ``body`` are its answer."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


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
