"""Path globs: ``*`` is exactly one segment, ``**`` zero or more; nothing else is special."""

from __future__ import annotations

import pytest

from protocol.errors import BadRequest
from protocol.glob import compile_glob, covers


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("chat/42", "chat/42", True),
        ("chat/42", "chat/420", False),
        ("chat/42", "chat/42/x", False),
        ("chat/42/*", "chat/42/a", True),
        ("chat/42/*", "chat/42", False),
        ("chat/42/*", "chat/42/a/b", False),
        ("chat/42/*", "chat/43/a", False),
        ("tenant-7/**", "tenant-7", True),
        ("tenant-7/**", "tenant-7/a", True),
        ("tenant-7/**", "tenant-7/a/b/c", True),
        ("tenant-7/**", "tenant-70/a", False),
        ("**", "anything/at/all", True),
        ("*", "one", True),
        ("*", "one/two", False),
        ("events/*/log", "events/x/log", True),
        ("events/*/log", "events/x/y/log", False),
        ("events/**/log", "events/log", True),
        ("events/**/log", "events/x/y/log", True),
        ("events/**/log", "events/x/y/logs", False),
        ("**/log", "a/b/log", True),
        ("a/**/**/b", "a/b", True),
        ("chat/*", "chat/", True),  # an empty last segment is still one segment
    ],
)
def test_glob_matches(pattern: str, path: str, expected: bool) -> None:
    assert compile_glob(pattern)(path) is expected


@pytest.mark.parametrize("pattern", ["", "a//b", "/a", "a/", "chat/4*", "a/b**", "x" * 1025])
def test_malformed_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(BadRequest):
        compile_glob(pattern)


def test_many_double_stars_stay_cheap() -> None:
    """Backtracking is memoised, so a hostile pattern cannot make matching exponential."""
    pattern = "/".join(["**"] * 30 + ["z"])
    assert compile_glob(pattern)("/".join(["a"] * 60)) is False


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("tenant-7/**", "tenant-7/chat/*", True),
        ("tenant-7/**", "tenant-7/**", True),
        ("tenant-7/**", "tenant-8/*", False),
        ("tenant-7/*", "tenant-7/**", False),  # ** reaches deeper than one segment
        ("tenant-7/*", "tenant-7/a", True),
        ("tenant-7/a", "tenant-7/*", False),
        ("**", "**", True),
        ("*/chat/*", "x/chat/*", True),
        ("*/chat/*", "x/chat/**", False),
        ("a/**/z", "a/b/c/z", True),
        ("a/**/z", "a/**/z", True),
        ("a/**/z", "a/*/y", False),
    ],
)
def test_covers_is_pattern_inclusion(outer: str, inner: str, expected: bool) -> None:
    assert covers(outer, inner) is expected
