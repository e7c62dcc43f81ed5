"""The retention horizon's rules (protocol/retention.py), one row per rule."""

from __future__ import annotations

import pytest

from protocol.errors import BadRequest, Conflict
from protocol.model import StreamMeta
from protocol.retention import BeforeRetention, check_retained, plan_horizon

TEXT = StreamMeta(1, "s", "text/plain", tail=100, retained_from=10)
JSON = StreamMeta(2, "j", "application/json", tail=100, retained_from=10)


@pytest.mark.parametrize(
    ("meta", "offset", "previous", "outcome"),
    [
        pytest.param(TEXT, 50, b"x", 50, id="forward"),
        pytest.param(TEXT, 100, b"x", 100, id="up-to-the-tail"),
        pytest.param(TEXT, 10, b"x", None, id="same-is-a-no-op"),
        pytest.param(TEXT, 9, b"x", Conflict, id="never-back"),
        pytest.param(TEXT, 101, b"x", BadRequest, id="past-the-tail"),
        pytest.param(JSON, 50, b"\n", 50, id="json-on-a-boundary"),
        pytest.param(JSON, 50, b"}", BadRequest, id="json-inside-a-message"),
    ],
)
def test_plan_horizon(
    meta: StreamMeta, offset: int, previous: bytes, outcome: int | type[Exception] | None
) -> None:
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            plan_horizon(meta, offset, previous)
    else:
        assert plan_horizon(meta, offset, previous) == outcome


@pytest.mark.parametrize(("position", "gone"), [(0, True), (9, True), (10, False), (100, False)])
def test_reads_before_the_horizon_are_gone(position: int, gone: bool) -> None:
    if gone:
        with pytest.raises(BeforeRetention) as caught:
            check_retained(TEXT, position)
        assert caught.value.retained_from == 10
    else:
        check_retained(TEXT, position)
