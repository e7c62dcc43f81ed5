"""The idempotent-producer state machine of section 5.2.1, as a pure decision."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from protocol.errors import BadRequest, SequenceGap, StaleEpoch
from protocol.headers import ProducerHeaders
from protocol.model import ProducerState


class Verdict(Enum):
    ACCEPT = "accept"  # new data: append it and store ``state``
    DUPLICATE = "duplicate"  # already applied: answer 204, change nothing


@dataclass(frozen=True, slots=True)
class ProducerDecision:
    verdict: Verdict
    state: ProducerState  # the state to store on ACCEPT; the current state on DUPLICATE


def decide(current: ProducerState | None, request: ProducerHeaders) -> ProducerDecision:
    """Check one request against the stored producer state.

    Raises StaleEpoch (403) for a fenced epoch, BadRequest (400) when a new epoch does not
    start at seq 0, and SequenceGap (409) when sequence numbers were skipped. A producer the
    stream has never seen behaves as if it had epoch -1: it must start at seq 0.
    """
    epoch, seq = request.epoch, request.seq
    if current is None or epoch > current.epoch:
        if seq != 0:
            if current is None:
                raise SequenceGap(0, seq)
            raise BadRequest("producer_epoch_seq", "a new producer epoch must start at seq 0")
        return ProducerDecision(Verdict.ACCEPT, ProducerState(epoch, 0))
    if epoch < current.epoch:
        raise StaleEpoch(current.epoch)
    if seq <= current.last_seq:
        return ProducerDecision(Verdict.DUPLICATE, current)
    if seq == current.last_seq + 1:
        return ProducerDecision(Verdict.ACCEPT, ProducerState(epoch, seq, current.acks))
    raise SequenceGap(current.last_seq + 1, seq)
