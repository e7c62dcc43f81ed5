"""Soft revision on the same stream, while readers are live (docs/CORRECTIONS.md):
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
from typing import Any

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


NEEDS_NODE = pytest.mark.skipif(
    shutil.which("node") is None or not (WEB / "node_modules").is_dir(),
    reason="needs node and `npm ci` in examples/chat/web (scripts/test does both)",
)
CORRECTIONS = Path(__file__).resolve().parent.parent / "docs" / "CORRECTIONS.md"
RECIPES = WEB / "e2e" / "corrections.mjs"


def _node(script: str, url: str) -> Any:
    """Run one of the page's node checks against ``url``; its last line is its JSON verdict."""
    done = subprocess.run(
        ["node", script, url], cwd=WEB, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@NEEDS_NODE
def test_a_state_stream_revised_under_one_txid_converges_for_live_and_late_streamdb(
    relay: RelayProcess,
) -> None:
    seen = _node("e2e/revise-check.mjs", f"{relay.url}/v1/stream/chat/7/state")
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


@NEEDS_NODE
def test_the_typescript_recipes_supersede_retain_and_compact_for_a_late_streamdb(
    relay: RelayProcess,
) -> None:
    """The recipes of docs/CORRECTIONS.md for the official TypeScript client, run as written: the
    old reply links its successor, which holds the good prefix and the correction; after a
    snapshot and a retention horizon a late StreamDB reader has the current rows and
    downloaded less than the history it no longer needs."""
    seen = _node("e2e/corrections.mjs", f"{relay.url}/v1/stream")
    run = seen["run"]
    assert seen["supersede"] == {
        "old": "The capital is Lyon.",
        "link": f'</v1/stream/ts-answer-2-{run}>; rel="successor-version"',
        "successor": "The capital is Paris.",
    }
    assert seen["late"] == [{"id": str(n % 3), "title": f"title {n}"} for n in (27, 28, 29)]
    assert seen["retainedFrom"]
    assert 0 < seen["lateDownloaded"] < seen["historyBytes"]


def test_the_readme_shows_the_typescript_recipes_as_the_test_runs_them() -> None:
    source = RECIPES.read_text()
    blocks = source.split("// -- recipe: ")[1:]
    assert [block.split("\n", 1)[0] for block in blocks] == ["supersede", "retain"]
    doc = CORRECTIONS.read_text()
    for block in blocks:
        body = block.split("\n", 1)[1].split("// -- end", 1)[0].strip()
        assert body in doc, f"docs/CORRECTIONS.md lacks the {block.split()[0]} recipe"
