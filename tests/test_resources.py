"""The open-file limit is raised at start-up: each connection and parked reader holds one."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from relay.resources import raise_open_files


@pytest.fixture
def low_soft_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        yield low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_to_the_hard_one(low_soft_limit: int) -> None:
    limits = raise_open_files()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert limits.before == low_soft_limit
    assert limits.soft == soft
    assert limits.hard == hard
    if hard != resource.RLIM_INFINITY:
        assert soft == hard
    assert soft > low_soft_limit or hard == low_soft_limit


def test_raising_again_changes_nothing(low_soft_limit: int) -> None:
    first = raise_open_files()
    second = raise_open_files()
    assert second.before == second.soft == first.soft
