"""Path globs over stream-root-relative paths: ``*`` is one segment, ``**`` zero or more.

One rule for two users: subscription patterns (section 6.2) and access grants. Segments are
split on ``/``; a literal segment matches only itself (no partial wildcards such as ``a*``,
which would make a grant's reach hard to read at a glance).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from protocol.errors import BadRequest

MAX_PATTERN_LENGTH = 1024

Matcher = Callable[[str], bool]


def check_pattern(pattern: str) -> tuple[str, ...]:
    """The pattern's segments, or 400 when it is not a glob this module can answer for."""
    if not pattern or len(pattern.encode()) > MAX_PATTERN_LENGTH:
        raise BadRequest("invalid_pattern", "pattern must be 1..1024 bytes")
    segments = tuple(pattern.split("/"))
    for segment in segments:
        if segment == "":
            raise BadRequest("invalid_pattern", "pattern segments must not be empty")
        if "*" in segment and segment not in ("*", "**"):
            raise BadRequest("invalid_pattern", "* and ** must be whole segments")
    return segments


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> Matcher:
    """A predicate telling whether a path matches ``pattern`` (checked with ``check_pattern``)."""
    segments = check_pattern(pattern)
    if "**" not in segments and "*" not in segments:
        return pattern.__eq__

    def matches(path: str) -> bool:
        return _match(segments, tuple(path.split("/")))

    return matches


def _match(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    """Segment matching with memoised backtracking over ``**``: O(len(pattern) * len(path))."""
    seen: dict[tuple[int, int], bool] = {}

    def at(i: int, j: int) -> bool:
        key = (i, j)
        if key in seen:
            return seen[key]
        if i == len(pattern):
            result = j == len(path)
        elif pattern[i] == "**":
            result = at(i + 1, j) or (j < len(path) and at(i, j + 1))
        elif j == len(path):
            result = False
        else:
            result = pattern[i] in ("*", path[j]) and at(i + 1, j + 1)
        seen[key] = result
        return result

    return at(0, 0)


def covers(outer: str, inner: str) -> bool:
    """Whether every path ``inner`` matches is also matched by ``outer``.

    Used to ask whether a grant's pattern reaches every stream a subscription pattern could
    link. Sound, not complete: a True is always right; a rare False for an exotic pair of
    patterns only means a narrower grant is needed.
    """
    big, small = check_pattern(outer), check_pattern(inner)
    seen: dict[tuple[int, int], bool] = {}

    def at(i: int, j: int) -> bool:
        key = (i, j)
        if key not in seen:
            if j == len(small):
                result = all(segment == "**" for segment in big[i:])
            elif i == len(big):
                result = False
            elif big[i] == "**":  # absorbs nothing more, or one more of inner's segments
                result = at(i + 1, j) or at(i, j + 1)
            elif small[j] == "**" or (big[i] != "*" and big[i] != small[j]):
                result = False
            else:  # "*" covers "*" and any literal; a literal covers itself
                result = at(i + 1, j + 1)
            seen[key] = result
        return seen[key]

    return at(0, 0)
