"""What an append does to a stream: one pure decision that every store runs in its transaction.

Stores load the stream and the producer's state, call :func:`decide_append`, and commit the
returned plan (data, new tail, closure, producer state, ``Stream-Seq``) atomically. Keeping the
rules here means no backend re-implements them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from protocol.errors import BadRequest, Conflict, ProtocolError, StreamClosed
from protocol.headers import ProducerHeaders, media_type
from protocol.model import ProducerState, StreamMeta
from protocol.producer import Verdict, decide


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """An append as the handler parsed it.

    ``data`` is what would be stored (JSON already flattened). ``data_error`` holds a body
    validation failure, raised only after the closed and content-type checks so that the
    spec's error precedence holds.
    """

    content_type: str | None
    data: bytes
    close: bool = False
    stream_seq: str | None = None
    producer: ProducerHeaders | None = None
    data_error: ProtocolError | None = None
    body_empty: bool = False
    successor: str | None = None
    """``Stream-Successor``: the path of the stream that supersedes this one (with a close)."""


@dataclass(frozen=True, slots=True)
class AppendPlan:
    """The outcome to commit and report.

    ``write`` is False for duplicates and idempotent closes: nothing changes. Otherwise the
    store appends ``data`` at ``meta.tail``, sets ``closed``, and stores ``producer_state``
    (if any) and ``stream_seq`` (if any), all in one transaction.
    """

    write: bool
    data: bytes
    close: bool
    stream_seq: str | None
    producer: ProducerHeaders | None
    producer_state: ProducerState | None
    duplicate: bool = False
    acked_offset: int | None = None
    """A duplicate's original acknowledgement (its end offset), when still remembered."""
    successor: str | None = None


def decide_append(
    meta: StreamMeta, producer_state: ProducerState | None, request: AppendRequest
) -> AppendPlan:
    """Apply section 5.2's rules in the spec's precedence: closed, content type, sequence."""
    producer = request.producer
    close_only = request.close and request.body_empty
    if request.successor is not None:
        successor = _successor_plan(meta, request)
        if successor is not None:
            return successor
    if meta.closed:
        if producer is not None and meta.closed_by == producer:
            return _nothing(request, producer_state, duplicate=True)
        if close_only:
            return _nothing(request, producer_state, duplicate=False)
        raise StreamClosed(meta.tail)
    if request.body_empty and not request.close:
        raise BadRequest("empty_body", "an append needs a body unless it closes the stream")
    if not request.body_empty and not request.content_type:
        raise BadRequest("missing_content_type", "an append with a body needs a Content-Type")
    if not request.body_empty and media_type(request.content_type) != media_type(meta.content_type):
        raise Conflict("content_type_mismatch", "Content-Type does not match the stream")
    if request.data_error is not None:
        raise request.data_error
    new_state: ProducerState | None = None
    if producer is not None:
        decision = decide(producer_state, producer)
        if decision.verdict is Verdict.DUPLICATE:
            plan = _nothing(request, decision.state, duplicate=True)
            return replace(plan, acked_offset=decision.state.acked(producer.seq))
        new_state = decision.state.with_ack(producer.seq, meta.tail + len(request.data))
    seq, last = request.stream_seq, meta.stream_seq
    if seq is not None and last is not None and seq.encode() <= last.encode():
        raise Conflict("stream_seq_regression", "Stream-Seq must be strictly increasing")
    return AppendPlan(
        write=True,
        data=request.data,
        close=request.close,
        stream_seq=request.stream_seq,
        producer=producer,
        producer_state=new_state,
        successor=request.successor,
    )


def _successor_plan(meta: StreamMeta, request: AppendRequest) -> AppendPlan | None:
    """Naming a successor: only with a close, and once. A stream already closed may still be
    given one by a close-only request (a finished reply regenerated later); the same one
    again is an idempotent repeat. None: an open stream, decided as any closing append."""
    if not request.close:
        raise BadRequest("successor_without_close", "Stream-Successor needs Stream-Closed: true")
    if meta.successor is not None and meta.successor != request.successor:
        raise Conflict("successor_conflict", "the stream already names another successor")
    if not meta.closed:
        return None
    if not request.body_empty:
        raise StreamClosed(meta.tail)
    if meta.successor == request.successor:
        return _nothing(request, None, duplicate=False)
    return AppendPlan(
        write=True,
        data=b"",
        close=True,
        stream_seq=None,
        producer=None,
        producer_state=None,
        successor=request.successor,
    )


def _nothing(request: AppendRequest, state: ProducerState | None, *, duplicate: bool) -> AppendPlan:
    return AppendPlan(
        write=False,
        data=b"",
        close=False,
        stream_seq=None,
        producer=request.producer,
        producer_state=state,
        duplicate=duplicate,
    )
