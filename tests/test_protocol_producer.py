"""The idempotent-producer state machine (section 5.2.1), one row per rule."""

from __future__ import annotations

import pytest

from protocol.errors import BadRequest, ProtocolError, SequenceGap, StaleEpoch
from protocol.headers import ProducerHeaders
from protocol.model import ProducerState
from protocol.producer import Verdict, decide

ACCEPT, DUPLICATE = Verdict.ACCEPT, Verdict.DUPLICATE


@pytest.mark.parametrize(
    ("current", "epoch", "seq", "verdict", "state"),
    [
        pytest.param(None, 0, 0, ACCEPT, (0, 0), id="new-producer-starts-at-0"),
        pytest.param(None, 5, 0, ACCEPT, (5, 0), id="new-producer-any-epoch"),
        pytest.param((0, 0), 0, 1, ACCEPT, (0, 1), id="next-seq"),
        pytest.param((3, 9), 3, 10, ACCEPT, (3, 10), id="next-seq-later-epoch"),
        pytest.param((0, 4), 0, 4, DUPLICATE, (0, 4), id="retry-of-last"),
        pytest.param((0, 4), 0, 1, DUPLICATE, (0, 4), id="older-duplicate"),
        pytest.param((0, 4), 1, 0, ACCEPT, (1, 0), id="new-epoch-resets-seq"),
        pytest.param((0, 4), 7, 0, ACCEPT, (7, 0), id="epoch-may-jump"),
    ],
)
def test_accepted_and_duplicate_requests(
    current: tuple[int, int] | None,
    epoch: int,
    seq: int,
    verdict: Verdict,
    state: tuple[int, int],
) -> None:
    stored = ProducerState(*current) if current else None
    decision = decide(stored, ProducerHeaders("p", epoch, seq))
    assert decision.verdict is verdict
    assert decision.state == ProducerState(*state)


@pytest.mark.parametrize(
    ("current", "epoch", "seq", "error", "details"),
    [
        pytest.param((2, 0), 1, 0, StaleEpoch, {"current_epoch": 2}, id="stale-epoch-403"),
        pytest.param((2, 5), 0, 6, StaleEpoch, {"current_epoch": 2}, id="zombie-403"),
        pytest.param((0, 4), 0, 6, SequenceGap, {"expected": 5, "received": 6}, id="gap-409"),
        pytest.param(None, 0, 3, SequenceGap, {"expected": 0, "received": 3}, id="new-not-at-0"),
        pytest.param((0, 4), 1, 1, BadRequest, {}, id="new-epoch-not-at-0-400"),
    ],
)
def test_rejections_carry_their_context(
    current: tuple[int, int] | None,
    epoch: int,
    seq: int,
    error: type[ProtocolError],
    details: dict[str, int],
) -> None:
    stored = ProducerState(*current) if current else None
    with pytest.raises(error) as caught:
        decide(stored, ProducerHeaders("p", epoch, seq))
    for name, value in details.items():
        assert getattr(caught.value, name) == value
