"""relay_producer against a real ``relay serve``: batching, order, modes, errors, kill -9."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from relay_producer import (
    ContentTypeMismatch,
    InvalidRequest,
    PayloadTooLarge,
    ProducerFenced,
    StreamClosed,
    StreamNotFound,
    StreamProducer,
)

from tests.relay_process import RelayProcess


@pytest.fixture(params=["sqlite", "postgres"])
def relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayProcess]:
    """A real relay on each store (restartable on the same data: directory or database)."""
    extra: tuple[str, ...] = ()
    if request.param == "postgres":
        extra = ("--database-url", request.getfixturevalue("pg_url"))
    proc = RelayProcess(tmp_path / "data", *extra)
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
        async with StreamProducer(
            url, producer_id="q", content_type="text/plain", create=False
        ) as q:
            await q.append("x")
    with pytest.raises(ContentTypeMismatch):
        async with StreamProducer(url, producer_id="r"):
            pass
    with pytest.raises(StreamNotFound):
        async with StreamProducer(
            f"{relay.url}/v1/stream/none", producer_id="s", create=False
        ) as s:
            await s.append(1)


async def test_kill_9_mid_reply_stores_reply_once(relay: RelayProcess) -> None:
    url = f"{relay.url}/v1/stream/reply"
    tokens = [f"tok{i} " for i in range(40)]

    async def restart() -> None:
        await asyncio.sleep(0.3)  # a sleep: down a while, so the producer's retries meet it down
        await asyncio.to_thread(relay.start)  # off the loop: the producer keeps retrying

    restarting: asyncio.Task[None] | None = None
    async with StreamProducer(url, producer_id="m", content_type="text/plain") as p:
        for i, tok in enumerate(tokens):
            if i == 20:
                relay.kill()
                restarting = asyncio.create_task(restart())
            await p.append(tok)
        await p.close()
    assert restarting is not None
    await restarting
    assert await _read(url) == "".join(tokens)


async def test_a_503_with_retry_after_is_retried_and_applied_once(relay: RelayProcess) -> None:
    """A front that refuses the first two POSTs with 503 (as an overloaded relay does), then
    passes requests through: the producer waits, resends the same seq, and stores it once."""
    refused: list[float] = []

    async def front(request: web.Request) -> web.StreamResponse:
        if request.method == "POST" and len(refused) < 2:
            refused.append(time.monotonic())
            return web.Response(status=503, headers={"Retry-After": "0"})
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                request.method,
                f"{relay.url}{request.rel_url}",
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as upstream,
        ):
            body = await upstream.read()
            keep = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower().startswith(("stream-", "producer-", "content-type"))
            }
            return web.Response(status=upstream.status, headers=keep, body=body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", front)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        url = f"http://127.0.0.1:{port}/v1/stream/busy"
        async with StreamProducer(url, producer_id="b", content_type="text/plain") as p:
            await p.append("once")
            await p.close()
    finally:
        await runner.cleanup()
    assert len(refused) == 2
    assert await _read(f"{relay.url}/v1/stream/busy") == "once"


async def test_a_restarted_producer_takes_a_larger_epoch_and_fences_the_old_one(
    relay: RelayProcess,
) -> None:
    url = f"{relay.url}/v1/stream/epochs"
    async with StreamProducer(url, producer_id="llm", content_type="text/plain") as first:
        await first.append("a")
        await first.flush()
    await asyncio.sleep(0.01)  # a sleep: the next process start, on a later millisecond clock
    async with StreamProducer(
        url, producer_id="llm", content_type="text/plain", create=False
    ) as second:
        assert second.epoch > first.epoch
        await second.append("b")
        await second.flush()
    with pytest.raises(ProducerFenced):
        async with StreamProducer(
            url, producer_id="llm", content_type="text/plain", create=False, epoch=first.epoch
        ) as stale:
            await stale.append("c")
    assert await _read(url) == "ab"


async def test_a_malformed_request_and_an_oversized_batch_have_types_of_their_own(
    tmp_path: Path,
) -> None:
    relay = RelayProcess(tmp_path / "data", "--max-body-bytes", "1024")
    relay.start()
    try:
        with pytest.raises(InvalidRequest) as bad:
            async with StreamProducer(f"{relay.url}/v1/stream/a%00b", producer_id="p"):
                pass
        assert bad.value.status == 400 and "invalid_path" in bad.value.body
        async with StreamProducer(
            f"{relay.url}/v1/stream/big", producer_id="p", content_type="text/plain"
        ) as p:
            with pytest.raises(PayloadTooLarge):
                await p.append("x" * 4096)
            assert await p.append("fits") and await _read(f"{relay.url}/v1/stream/big") == "fits"
    finally:
        relay.kill()
