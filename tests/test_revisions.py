"""Soft revision on the same stream, while readers are live (README "Correcting a stream"):
the correction is new data in each consumer's own vocabulary, and live and late readers end with
the same corrected view. State Protocol streams through the official ``@durable-streams/state``
StreamDB; plain JSON token streams through the revision envelope of ``relay_producer``."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from relay_producer.revisions import ReplyText, revision, token

from tests.relay_process import RelayProcess, on_store

WEB = Path(__file__).resolve().parent.parent / "examples" / "chat" / "web"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(params=["sqlite", "postgres"])
def relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayProcess]:
    with on_store(request, tmp_path, "--long-poll-timeout", "5") as process:
        yield process


@pytest.mark.skipif(
    shutil.which("node") is None or not (WEB / "node_modules").is_dir(),
    reason="needs node and `npm ci` in examples/chat/web (scripts/test does both)",
)
def test_a_state_stream_revised_under_one_txid_converges_for_live_and_late_streamdb(
    relay: RelayProcess,
) -> None:
    done = subprocess.run(
        ["node", "e2e/revise-check.mjs", f"{relay.url}/v1/stream/chat/7/state"],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen["before"]) == 3
    assert seen["before"][0]["text"] == "The capital of France is Lyon."
    corrected = [
        {"id": "1", "text": "The capital of France is Paris."},
        {"id": "3", "text": "Ask me more."},
    ]
    assert seen["live"] == corrected and seen["late"] == corrected


async def test_a_token_stream_revised_converges_for_live_and_late_readers(
    relay: RelayProcess,
) -> None:
    url = f"{relay.url}/v1/stream/chat/7/reply"
    live = ReplyText()

    async def follow(session: aiohttp.ClientSession, offset: str) -> None:
        while True:
            params = {"offset": offset, "live": "long-poll"}
            async with session.get(url, params=params) as response:
                if response.status == 200:
                    for message in await response.json():
                        live.apply(message)
                offset = response.headers["Stream-Next-Offset"]
                if response.headers.get("Stream-Closed") == "true":
                    return

    async with aiohttp.ClientSession() as session:
        async with session.put(url, headers=JSON) as created:
            tail = created.headers["Stream-Next-Offset"]
        reader = asyncio.create_task(follow(session, tail))
        words = ["The ", "capital ", "is ", "Lyon", ", ", "I ", "think"]
        for index, word in enumerate(words):
            async with session.post(url, json=token(index, word)) as r:
                assert r.status == 204
        # The model (or a moderator) corrects from token 3 on: one POST, one message.
        async with session.post(url, json=[revision(3, "Paris"), token(4, ".")]) as r:
            assert r.status == 204
        async with session.post(url, headers={"Stream-Closed": "true"}) as r:
            assert r.status == 204
        await asyncio.wait_for(reader, 20)
        late = ReplyText()
        async with session.get(url, params={"offset": "-1"}) as response:
            for message in await response.json():
                late.apply(message)
    assert live.text == late.text == "The capital is Paris."
