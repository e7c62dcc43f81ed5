"""relay_producer's corrections against a real ``relay serve`` on each store: a revision that
live and late readers fold to the same text, a supersede that moves readers to a successor
holding the good prefix, and a retention horizon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from relay_producer import (
    ProducerError,
    StreamClosed,
    StreamNotFound,
    StreamProducer,
    retain,
    revise,
    supersede,
)
from relay_producer.revisions import ReplyText, token

from tests.relay_process import RelayProcess, on_store

TEXT = {"Content-Type": "text/plain"}


@pytest.fixture(params=["sqlite", "postgres"])
def relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayProcess]:
    with on_store(request, tmp_path) as process:
        yield process


async def _messages(session: aiohttp.ClientSession, url: str, offset: str = "-1") -> list[object]:
    async with session.get(url, params={"offset": offset}) as response:
        assert response.status == 200
        body: list[object] = await response.json()
        return body


async def test_revise_reaches_a_live_and_a_late_reader_alike(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/reply/revise"
    async with aiohttp.ClientSession() as session:
        async with StreamProducer(url, producer_id="model", session=session) as producer:
            for i, delta in enumerate(["The capital ", "is ", "Lyon", "."]):
                await producer.append(token(i, delta))
            live = ReplyText()
            for message in await _messages(session, url):
                live.apply(message)
            assert live.text == "The capital is Lyon."
            tail = producer.offset
            assert tail is not None
            revised_at = await revise(producer, 2, "Paris.")
            await producer.close()
        for message in await _messages(session, url, tail):  # the live reader reads on
            live.apply(message)
        late = ReplyText()
        for message in await _messages(session, url):
            late.apply(message)
    assert live.text == late.text == "The capital is Paris."
    assert revised_at > tail


async def test_supersede_forks_at_the_good_offset_and_links_the_old_stream(
    relay: RelayProcess,
) -> None:
    old, new = f"{relay.url}/v1/stream/answer-1", f"{relay.url}/v1/stream/answer-2"
    async with aiohttp.ClientSession() as session:
        async with StreamProducer(
            old, producer_id="model", content_type="text/plain", session=session
        ) as producer:
            good = await producer.append("The capital is ")
            await producer.append("Lyon.")
            assert await supersede(session, old, new, good, content_type="text/plain") == new
            with pytest.raises(StreamClosed):  # the old reply takes nothing more
                await producer.append("!")
        async with StreamProducer(
            new, producer_id="model-2", content_type="text/plain", create=False,
            session=session,
        ) as successor:  # fmt: skip
            await successor.append("Paris.")
            await successor.close()
        async with session.get(old, params={"offset": "-1"}) as response:
            assert await response.text() == "The capital is Lyon."  # the old branch stays
            assert response.headers["Link"] == '</v1/stream/answer-2>; rel="successor-version"'
        async with session.get(new, params={"offset": "-1"}) as response:
            assert await response.text() == "The capital is Paris."
        with pytest.raises(StreamNotFound):
            await supersede(session, f"{relay.url}/v1/stream/none", new + "x", good)
        with pytest.raises(ProducerError) as other:  # a second, different successor
            await supersede(session, old, new + "-b", good, content_type="text/plain")
        assert other.value.status == 409
        async with session.head(new + "-b") as response:  # the fork it made is gone again
            assert response.status in (404, 410)


async def test_retain_moves_the_horizon_forward_only(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/log"
    async with aiohttp.ClientSession() as session:
        async with StreamProducer(
            url, producer_id="log", content_type="text/plain", session=session
        ) as producer:
            first = await producer.append("old ")
            await producer.append("new")
        assert await retain(session, url, first) == first
        async with session.get(url, params={"offset": "-1"}) as response:
            assert await response.text() == "new"
        with pytest.raises(ProducerError) as back:
            await retain(session, url, "-1")
        assert back.value.status in (400, 409)
        async with session.get(url, params={"offset": "0000000000000000_0000000000000000"}) as r:
            assert r.status == 410  # a read before the horizon is gone
