"""Subscriptions across real relay processes: a relay killed with SIGKILL mid-delivery loses
no wake (a restarted relay delivers it again as a new generation, and the old generation's
callback is fenced), and relays sharing a Postgres database deliver each wake once, one at a
time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.relay_process import RelayProcess
from tests.stores import BACKENDS
from tests.waits import eventually
from tests.webhook_receiver import Received, Receiver

JSON = {"Content-Type": "application/json"}
FAST = ("--subscription-poll-interval", "0.05", "--webhook-timeout", "2")


@pytest.fixture(params=BACKENDS)
def relay_args(request: pytest.FixtureRequest) -> Iterator[tuple[str, ...]]:
    if request.param == "sqlite":
        yield FAST
    else:
        yield (*FAST, "--database-url", request.getfixturevalue("pg_url"))


async def test_a_wake_in_flight_when_the_relay_is_killed_is_delivered_again(
    relay_args: tuple[str, ...], tmp_path: Path
) -> None:
    never = asyncio.Event()

    async def first_hangs(_: Received, n: int) -> web.StreamResponse:
        if n == 1:
            await never.wait()  # the relay dies while this request is open
        return web.json_response({})

    relay = RelayProcess(tmp_path / "data", *relay_args)
    relay.start()
    try:
        async with Receiver(first_hangs) as receiver, aiohttp.ClientSession() as http:
            sub = f"{relay.url}/v1/stream/__ds/subscriptions/crash"
            config = {"type": "webhook", "pattern": "k/*", "webhook": {"url": receiver.url}}
            async with http.put(sub, json=config) as r:
                assert r.status == 201
            async with http.put(f"{relay.url}/v1/stream/k/1", data=b'{"a":1}', headers=JSON) as r:
                assert r.status == 201
            first = (await receiver.wait_for(1)).body
            relay.kill()
            relay.start()
            second = (await receiver.wait_for(2, timeout=30)).body
            assert second["generation"] == first["generation"] + 1
            assert second["streams"] == first["streams"]

            async def call_back(body: dict[str, Any]) -> tuple[int, Any]:
                acks = [{"stream": s["path"], "offset": s["tail_offset"]} for s in body["streams"]]
                done = {
                    "wake_id": body["wake_id"],
                    "generation": body["generation"],
                    "acks": acks,
                    "done": True,
                }
                headers = {"Authorization": f"Bearer {body['callback_token']}"}
                async with http.post(body["callback_url"], json=done, headers=headers) as r:
                    return r.status, await r.json()

            status, answer = await call_back(first)
            assert status == 409 and answer["error"]["code"] == "FENCED"
            assert await call_back(second) == (200, {"ok": True, "next_wake": False})
            never.set()
    finally:
        relay.stop()


@pytest.fixture
def pair(pg_url: str, tmp_path: Path) -> Iterator[tuple[RelayProcess, RelayProcess]]:
    relays = [RelayProcess(tmp_path / n, *FAST, "--database-url", pg_url) for n in ("a", "b")]
    try:
        for relay in relays:
            relay.start()
        yield relays[0], relays[1]
    finally:
        for relay in relays:
            relay.stop()


async def test_relays_sharing_a_database_deliver_each_wake_once_at_a_time(
    pair: tuple[RelayProcess, RelayProcess],
) -> None:
    async def slow_done(_: Received, __: int) -> web.StreamResponse:
        await asyncio.sleep(0.05)  # long enough for a second delivery to overlap, if one came
        return web.json_response({"done": True})

    a, b = pair
    appends = 30
    async with Receiver(slow_done) as receiver, aiohttp.ClientSession() as http:
        sub = f"{a.url}/v1/stream/__ds/subscriptions/once"
        config = {"type": "webhook", "pattern": "o/*", "webhook": {"url": receiver.url}}
        async with http.put(sub, json=config) as r:
            assert r.status == 201
        async with http.put(f"{a.url}/v1/stream/o/1", data=b"[]", headers=JSON) as r:
            assert r.status == 201
        tail = ""
        for i in range(appends):
            relay = (a, b)[i % 2]
            url = f"{relay.url}/v1/stream/o/1"
            async with http.post(url, data=b'{"i":%d}' % i, headers=JSON) as r:
                assert r.status == 204
                tail = r.headers["Stream-Next-Offset"]
            await asyncio.sleep(0.01)  # a sleep: appends spread out, so many wakes race

        async def caught_up() -> bool:
            for relay in (a, b):
                async with http.get(f"{relay.url}/v1/stream/__ds/subscriptions/once") as r:
                    links = (await r.json())["streams"]
                    if links[0]["acked_offset"] != tail:
                        return False
            return True

        await eventually(caught_up, timeout=30, what="every relay's view acked to the tail")
    wakes = [r.body["wake_id"] for r in receiver.received]
    generations = [r.body["generation"] for r in receiver.received]
    assert len(set(wakes)) == len(wakes), "a wake was delivered twice"
    assert generations == sorted(set(generations)), "generations went backwards"
    assert receiver.most_in_flight == 1, "two deliveries of one subscription overlapped"
