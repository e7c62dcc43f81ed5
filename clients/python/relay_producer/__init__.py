"""An idempotent, batching producer for Durable Streams (Producer-Id/Epoch/Seq)."""

from relay_producer.errors import (
    ContentTypeMismatch,
    ProducerError,
    ProducerFenced,
    SequenceGap,
    StreamClosed,
    StreamNotFound,
)
from relay_producer.producer import StreamProducer

__all__ = [
    "ContentTypeMismatch",
    "ProducerError",
    "ProducerFenced",
    "SequenceGap",
    "StreamClosed",
    "StreamNotFound",
    "StreamProducer",
]
