"""An idempotent, batching producer for Durable Streams (Producer-Id/Epoch/Seq), and the
corrections Relay supports on what it wrote (revise, supersede, retain)."""

from relay_producer.corrections import retain, revise, supersede
from relay_producer.errors import (
    ContentTypeMismatch,
    InvalidRequest,
    PayloadTooLarge,
    ProducerError,
    ProducerFenced,
    SequenceGap,
    StreamClosed,
    StreamNotFound,
)
from relay_producer.producer import StreamProducer

__all__ = [
    "ContentTypeMismatch",
    "InvalidRequest",
    "PayloadTooLarge",
    "ProducerError",
    "ProducerFenced",
    "SequenceGap",
    "StreamClosed",
    "StreamNotFound",
    "StreamProducer",
    "retain",
    "revise",
    "supersede",
]
