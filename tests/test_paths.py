"""Request targets to stream paths (relay/http/paths.py): the query never names the stream,
and the memo of checked paths is keyed on the path alone."""

from __future__ import annotations

import pytest

from protocol.errors import BadRequest
from relay.http import paths
from relay.http.paths import stream_path

TARGETS = [
    ("/v1/stream/a?offset=-1", "a"),  # the stream's name: the path after the prefix
    ("/v1/stream/a?x=/../b&live=sse", "a"),  # a query may hold anything
    ("/v1/stream/a%20b?offset=now", "a b"),
    ("http://relay.example/v1/stream/c?offset=-1", "c"),
    ("/v1/stream/d", "d"),
]


@pytest.mark.parametrize(("target", "path"), TARGETS)
def test_the_query_is_not_part_of_the_stream_path(target: str, path: str) -> None:
    assert stream_path(target, 1024) == path


def test_a_bad_path_is_refused_whatever_its_query() -> None:
    for query in ("", "?offset=-1", "?a=b"):
        with pytest.raises(BadRequest):
            stream_path(f"/v1/stream/a/../b{query}", 1024)


def test_one_memo_entry_serves_every_offset_of_a_reader() -> None:
    before = paths._checked_path.cache_info()
    for i in range(100):
        stream_path(f"/v1/stream/memo?offset=0000000000000000_{i:016d}&cursor={i}", 1024)
    after = paths._checked_path.cache_info()
    assert after.misses - before.misses == 1
    assert after.hits - before.hits == 99
