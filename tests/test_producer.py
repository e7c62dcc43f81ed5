"""relay_producer against a real ``relay serve``: batching, order, modes, errors, kill -9."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from relay_producer import ContentTypeMismatch, StreamClosed, StreamNotFound, StreamProducer

from tests.relay_process import RelayProcess


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = RelayProcess(tmp_path / "data")
    proc.start()
    yield proc
    proc.kill()


async def _read(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "?offset=-1") as r:
        return await r.text()


async def test_json_tokens_are_batched_in_order(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/json"
    async with StreamProducer(url, producer_id="p", linger=0.05) as p:
        offsets = await asyncio.gather(*(p.append({"t": i}) for i in range(20)))
        assert p.seq < 20  # fewer POSTs than tokens
        await p.close()
    assert offsets[-1]
    assert await _read(url) == "[" + ",".join(f'{{"t":{i}}}' for i in range(20)) + "]"


async def test_text_mode_and_typed_errors(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/text"
    async with StreamProducer(url, producer_id="p", content_type="text/plain") as p:
        for word in ["a", "b", "c"]:
            await p.append(word)
        await p.close()
    assert await _read(url) == "abc"
    with pytest.raises(StreamClosed):
        async with StreamProducer(url, producer_id="q", content_type="text/plain", create=False) as q:
            await q.append("x")
    with pytest.raises(ContentTypeMismatch):
        async with StreamProducer(url, producer_id="r"):
            pass
    with pytest.raises(StreamNotFound):
        async with StreamProducer(f"{relay.url}/v1/stream/none", producer_id="s", create=False) as s:
            await s.append(1)


async def test_kill_9_mid_reply_stores_reply_once(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/reply"
    tokens = [f"tok{i} " for i in range(40)]
    async with StreamProducer(url, producer_id="m", content_type="text/plain") as p:
        for i, tok in enumerate(tokens):
            if i == 20:
                relay.kill()
                asyncio.get_running_loop().call_later(0.3, relay.start)
            await p.append(tok)
        await p.close()
    assert await _read(url) == "".join(tokens)
