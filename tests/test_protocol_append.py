"""decide_append: section 5.2's rules in the spec's precedence (closed, then content type, then
body validity, then producer, then Stream-Seq)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from protocol.append import AppendRequest, decide_append
from protocol.errors import (
    BadRequest,
    Conflict,
    ProtocolError,
    SequenceGap,
    StaleEpoch,
    StreamClosed,
)
from protocol.headers import ProducerHeaders
from protocol.model import ProducerState, StreamMeta
from relay.store.common import after_append

OPEN = StreamMeta(1, "s", "text/plain", tail=10)
CLOSED = replace(OPEN, closed=True)
CLOSED_BY_P = replace(CLOSED, closed_by=ProducerHeaders("p", 0, 3))
SEQ_B = replace(OPEN, stream_seq="b")
P = ProducerHeaders("p", 0, 1)
BAD_JSON = BadRequest("invalid_json", "bad")


def req(data: bytes = b"x", content_type: str | None = "text/plain", **kw: object) -> AppendRequest:
    return AppendRequest(content_type, data, body_empty=not data, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("meta", "state", "request_", "error"),
    [
        pytest.param(CLOSED, None, req(), StreamClosed, id="append-to-closed"),
        pytest.param(
            CLOSED,
            None,
            req(content_type="application/json"),
            StreamClosed,
            id="closed-before-content-type",
        ),
        pytest.param(
            CLOSED, None, req(data_error=BAD_JSON), StreamClosed, id="closed-before-body-validity"
        ),
        pytest.param(OPEN, None, req(b""), BadRequest, id="empty-body-without-close"),
        pytest.param(OPEN, None, req(content_type=None), BadRequest, id="missing-content-type"),
        pytest.param(
            OPEN, None, req(content_type="application/json"), Conflict, id="content-type-mismatch"
        ),
        pytest.param(
            OPEN,
            None,
            req(content_type="application/json", data_error=BAD_JSON),
            Conflict,
            id="content-type-before-body-validity",
        ),
        pytest.param(OPEN, None, req(data_error=BAD_JSON), BadRequest, id="invalid-body"),
        pytest.param(OPEN, ProducerState(1, 0), req(producer=P), StaleEpoch, id="fenced"),
        pytest.param(
            OPEN,
            ProducerState(0, 5),
            req(producer=ProducerHeaders("p", 0, 9)),
            SequenceGap,
            id="gap",
        ),
        pytest.param(SEQ_B, None, req(stream_seq="a"), Conflict, id="stream-seq-regression"),
        pytest.param(SEQ_B, None, req(stream_seq="b"), Conflict, id="stream-seq-repeat"),
        pytest.param(SEQ_B, None, req(stream_seq="B"), Conflict, id="stream-seq-bytewise"),
    ],
)
def test_rejections_follow_the_spec_precedence(
    meta: StreamMeta,
    state: ProducerState | None,
    request_: AppendRequest,
    error: type[ProtocolError],
) -> None:
    with pytest.raises(error) as caught:
        decide_append(meta, state, request_)
    assert type(caught.value) is error


@pytest.mark.parametrize(
    ("meta", "state", "request_", "write", "duplicate", "close"),
    [
        pytest.param(OPEN, None, req(), True, False, False, id="plain-append"),
        pytest.param(
            OPEN,
            None,
            req(content_type="text/plain; charset=utf-8"),
            True,
            False,
            False,
            id="parameters-ignored",
        ),
        pytest.param(OPEN, None, req(b"", close=True), True, False, True, id="close-only"),
        pytest.param(OPEN, None, req(close=True), True, False, True, id="append-and-close"),
        pytest.param(
            CLOSED, None, req(b"", close=True), False, False, False, id="close-again-is-idempotent"
        ),
        pytest.param(
            CLOSED_BY_P,
            ProducerState(0, 3),
            req(close=True, producer=ProducerHeaders("p", 0, 3)),
            False,
            True,
            False,
            id="retried-closing-append-deduplicates",
        ),
        pytest.param(
            OPEN, ProducerState(0, 1), req(producer=P), False, True, False, id="producer-duplicate"
        ),
        pytest.param(
            OPEN, ProducerState(0, 0), req(producer=P), True, False, False, id="producer-next"
        ),
        pytest.param(SEQ_B, None, req(stream_seq="c"), True, False, False, id="stream-seq-up"),
        pytest.param(
            SEQ_B, None, req(stream_seq="ba"), True, False, False, id="stream-seq-longer-is-greater"
        ),
        pytest.param(
            OPEN,
            None,
            req(b"", close=True, content_type="application/json"),
            True,
            False,
            True,
            id="close-only-ignores-content-type",
        ),
    ],
)
def test_accepted_plans(
    meta: StreamMeta,
    state: ProducerState | None,
    request_: AppendRequest,
    write: bool,
    duplicate: bool,
    close: bool,
) -> None:
    plan = decide_append(meta, state, request_)
    assert (plan.write, plan.duplicate, plan.close) == (write, duplicate, close)
    assert plan.data == (request_.data if write else b"")


def test_an_accepted_producer_append_carries_the_state_to_store() -> None:
    plan = decide_append(OPEN, ProducerState(0, 0), req(producer=P, stream_seq="z"))
    assert plan.producer_state == ProducerState(0, 1, ((1, OPEN.tail + 1),))  # its ack offset
    assert plan.stream_seq == "z"


ACKED = ProducerState(0, 9, tuple((seq, 100 + seq) for seq in range(2, 10)))  # 8 remembered


@pytest.mark.parametrize(
    ("state", "producer", "acked"),
    [
        pytest.param(ACKED, ProducerHeaders("p", 0, 9), 109, id="newest-gets-its-own-offset"),
        pytest.param(ACKED, ProducerHeaders("p", 0, 4), 104, id="older-in-window-too"),
        pytest.param(ACKED, ProducerHeaders("p", 0, 2), 102, id="oldest-remembered"),
        pytest.param(ACKED, ProducerHeaders("p", 0, 1), None, id="older-gets-the-tail"),
        pytest.param(ProducerState(0, 5), ProducerHeaders("p", 0, 5), None, id="stored-before"),
    ],
)
def test_a_duplicate_is_answered_with_its_original_acknowledgement(
    state: ProducerState, producer: ProducerHeaders, acked: int | None
) -> None:
    """Section 5.2.1's retry of an append already applied, with later appends since: its
    answer names where its own data ends (the handler falls back to the tail when None)."""
    meta = replace(OPEN, tail=200)
    plan = decide_append(meta, state, req(producer=producer))
    assert (plan.write, plan.duplicate, plan.acked_offset) == (False, True, acked)


def test_producer_acks_keep_the_newest_eight_of_the_epoch_only() -> None:
    state = ProducerState(0, 0, ((0, 11),))
    tail = 11
    for seq in range(1, 12):
        plan = decide_append(
            replace(OPEN, tail=tail), state, req(producer=ProducerHeaders("p", 0, seq))
        )
        assert plan.producer_state is not None
        state, tail = plan.producer_state, tail + 1
    assert [seq for seq, _ in state.acks] == list(range(4, 12))
    assert state.acked(11) == tail and state.acked(3) is None
    fenced = decide_append(
        replace(OPEN, tail=tail), state, req(producer=ProducerHeaders("p", 1, 0))
    )
    assert fenced.producer_state == ProducerState(1, 0, ((0, tail + 1),))


def test_a_closed_stream_reports_its_final_tail() -> None:
    with pytest.raises(StreamClosed) as caught:
        decide_append(CLOSED, None, req())
    assert caught.value.tail == CLOSED.tail


@pytest.mark.parametrize(
    ("meta", "request_", "outcome"),
    [
        pytest.param(OPEN, req(b"", close=True, successor="/n"), "/n", id="close-names-it"),
        pytest.param(OPEN, req(close=True, successor="/n"), "/n", id="last-append-and-close"),
        pytest.param(CLOSED, req(b"", close=True, successor="/n"), "/n", id="after-the-close"),
        pytest.param(
            replace(CLOSED, successor="/n"),
            req(b"", close=True, successor="/n"),
            None,
            id="same-again-is-idempotent",
        ),
        pytest.param(OPEN, req(successor="/n"), BadRequest, id="without-a-close"),
        pytest.param(
            replace(CLOSED, successor="/n"),
            req(b"", close=True, successor="/m"),
            Conflict,
            id="another-is-refused",
        ),
        pytest.param(CLOSED, req(close=True, successor="/n"), StreamClosed, id="data-after-close"),
    ],
)
def test_naming_a_successor(
    meta: StreamMeta, request_: AppendRequest, outcome: str | type[Exception] | None
) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            decide_append(meta, None, request_)
        return
    plan = decide_append(meta, None, request_)
    assert plan.write is (outcome is not None) and plan.successor == outcome
    if plan.write:
        assert plan.close and after_append(meta, plan, 0.0).successor == outcome
