"""Create and fork (sections 4.1, 4.2, 5.1): idempotent PUTs, fork points, TTL inheritance and
the segments a fork reads."""

from __future__ import annotations

from dataclasses import replace

import pytest

from protocol.create import CreatePlan, CreateRequest, ForkRequest, plan_create
from protocol.errors import BadRequest, Conflict, ProtocolError
from protocol.lifecycle import Expiry
from protocol.model import Segment, StreamMeta, fork_segments

SOURCE = StreamMeta(7, "src", "text/plain", tail=10, ttl=60)
JSON_SOURCE = StreamMeta(8, "js", "application/json", tail=6)  # messages: 1\n22\n3\n


def put(
    content_type: str | None = "text/plain",
    *,
    ttl: int | None = None,
    expires_at: float | None = None,
    closed: bool = False,
    body: bytes = b"",
    fork: ForkRequest | None = None,
) -> CreateRequest:
    return CreateRequest("new", content_type, Expiry(ttl, expires_at), closed, body, fork)


@pytest.mark.parametrize(
    ("request_", "content_type", "data", "ttl"),
    [
        pytest.param(put(), "text/plain", b"", None, id="plain"),
        pytest.param(put(None), "application/octet-stream", b"", None, id="default-type"),
        pytest.param(
            put("application/json", body=b"[1,2]"),
            "application/json",
            b"1\n2\n",
            None,
            id="json-initial-body-flattened",
        ),
        pytest.param(put(ttl=5), "text/plain", b"", 5, id="ttl"),
    ],
)
def test_new_streams(
    request_: CreateRequest, content_type: str, data: bytes, ttl: int | None
) -> None:
    plan = plan_create(None, None, request_)
    assert isinstance(plan, CreatePlan)
    assert (plan.content_type, plan.data, plan.expiry.ttl) == (content_type, data, ttl)


EXISTING = StreamMeta(1, "new", "text/plain", tail=3, ttl=5)


@pytest.mark.parametrize(
    ("request_", "outcome"),
    [
        pytest.param(put(ttl=5), "same", id="identical-repeat-200"),
        pytest.param(put("TEXT/PLAIN; charset=utf-8", ttl=5), "same", id="type-essence-matches"),
        pytest.param(put(ttl=5, body=b"ignored"), "same", id="body-not-compared"),
        pytest.param(put("application/json", ttl=5), Conflict, id="other-type-409"),
        pytest.param(put(ttl=6), Conflict, id="other-ttl-409"),
        pytest.param(put(), Conflict, id="ttl-dropped-409"),
        pytest.param(put(expires_at=2e9), Conflict, id="expiry-kind-409"),
        pytest.param(put(ttl=5, closed=True), Conflict, id="closure-compared-409"),
    ],
)
def test_repeated_puts(request_: CreateRequest, outcome: object) -> None:
    if outcome == "same":
        assert plan_create(EXISTING, None, request_) is EXISTING
    else:
        with pytest.raises(Conflict):
            plan_create(EXISTING, None, request_)


def test_a_soft_deleted_path_cannot_be_recreated() -> None:
    with pytest.raises(Conflict):
        plan_create(replace(EXISTING, soft_deleted=True), None, put(ttl=5))


@pytest.mark.parametrize(
    ("source", "fork", "after_anchor", "fork_offset"),
    [
        pytest.param(SOURCE, ForkRequest("src", None), b"", 10, id="default-at-tail"),
        pytest.param(SOURCE, ForkRequest("src", 4), b"", 4, id="at-offset"),
        pytest.param(SOURCE, ForkRequest("src", 0), b"", 0, id="at-start"),
        pytest.param(SOURCE, ForkRequest("src", 4, 3), b"456789", 7, id="byte-sub-offset"),
        pytest.param(
            JSON_SOURCE,
            ForkRequest("js", 0, 2),
            b"1\n22\n3\n",
            5,
            id="json-sub-offset-counts-messages",
        ),
    ],
)
def test_fork_points(
    source: StreamMeta, fork: ForkRequest, after_anchor: bytes, fork_offset: int
) -> None:
    plan = plan_create(None, source, put(None, fork=fork), after_anchor)
    assert isinstance(plan, CreatePlan)
    assert plan.fork_offset == fork_offset
    assert plan.content_type == source.content_type


@pytest.mark.parametrize(
    ("source", "request_", "error"),
    [
        pytest.param(
            SOURCE, put(None, fork=ForkRequest("src", 11)), BadRequest, id="offset-past-tail"
        ),
        pytest.param(
            SOURCE, put(None, fork=ForkRequest("src", 8, 5)), BadRequest, id="sub-offset-past-data"
        ),
        pytest.param(
            SOURCE,
            put("application/json", fork=ForkRequest("src", 0)),
            Conflict,
            id="fork-changes-type",
        ),
        pytest.param(
            replace(SOURCE, soft_deleted=True),
            put(None, fork=ForkRequest("src", 0)),
            Conflict,
            id="deleted-source",
        ),
    ],
)
def test_bad_forks(source: StreamMeta, request_: CreateRequest, error: type[ProtocolError]) -> None:
    after = b"89" if request_.fork and request_.fork.sub_offset else b""
    with pytest.raises(error):
        plan_create(None, source, request_, after)


@pytest.mark.parametrize(
    ("requested", "inherited"),
    [
        pytest.param(Expiry(), Expiry(ttl=60), id="nothing-requested-inherits-source-ttl"),
        pytest.param(Expiry(ttl=5), Expiry(ttl=5), id="own-ttl-wins"),
        pytest.param(Expiry(expires_at=2e9), Expiry(expires_at=2e9), id="own-deadline-wins"),
    ],
)
def test_fork_ttl_inheritance(requested: Expiry, inherited: Expiry) -> None:
    fork = put(None, ttl=requested.ttl, expires_at=requested.expires_at, fork=ForkRequest("src", 0))
    plan = plan_create(None, SOURCE, fork)
    assert isinstance(plan, CreatePlan)
    assert plan.expiry == inherited


@pytest.mark.parametrize(
    ("chain", "segments"),
    [
        pytest.param([(1, 0)], [Segment(1, 0, None)], id="plain-stream"),
        pytest.param([(2, 4), (1, 0)], [Segment(1, 0, 4), Segment(2, 4, None)], id="fork"),
        pytest.param([(2, 0), (1, 0)], [Segment(2, 0, None)], id="fork-at-zero"),
        pytest.param(
            [(3, 6), (2, 4), (1, 0)],
            [Segment(1, 0, 4), Segment(2, 4, 6), Segment(3, 6, None)],
            id="grandchild",
        ),
        pytest.param(
            [(3, 2), (2, 4), (1, 0)],
            [Segment(1, 0, 2), Segment(3, 2, None)],
            id="grandchild-cut-inside-inherited-range",
        ),
    ],
)
def test_fork_segments(chain: list[tuple[int, int]], segments: list[Segment]) -> None:
    assert list(fork_segments(chain)) == segments
