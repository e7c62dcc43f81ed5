"""State Protocol streams that compact themselves: ``PUT`` with ``Stream-Compact: state``
folds the history by ``(type, key)`` into the live rows, appends them as a snapshot and moves
the horizon to its start, in one transaction, on both stores. A late reader downloads the live
rows only; a live reader gets the snapshot as new messages and, applying them as StreamDB does
(an unchanged insert of a row it holds is an update), ends with the same rows; a reader before
the horizon gets 410."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from protocol.offsets import format_offset
from protocol.state import fold
from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT
from tests.serving import AppClient
from tests.stores import Backend, backend
from tests.waits import wait_for

__all__ = ["backend"]  # the fixture, imported so pytest finds it here

JSON = {"Content-Type": "application/json"}
S = "/v1/stream/chat/1/state"
COMPACT = {"Stream-Compact": "state"}


@pytest.fixture
async def client(backend: Backend, aiohttp_client: AiohttpClient) -> AppClient:
    config = Config(data_dir=str(backend.data_dir), database_url=backend.url or "")
    return await aiohttp_client(make_app(config))


def change(entity: str, key: str, operation: str, value: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": entity, "key": key, "headers": {"operation": operation}}
    if value is not None:
        message["value"] = value
    return message


def chat_history(replies: int, tokens: int) -> list[list[dict[str, Any]]]:
    """Appends as a chat makes them: a chat row, then per reply a user message, the reply row
    and one update of it per streamed token batch, the last marking it done."""
    appends = [[change("chat", "1", "insert", {"id": "1", "title": "a chat"})]]
    for n in range(replies):
        appends.append([change("message", f"u{n}", "insert", {"role": "user", "text": f"q{n}"})])
        text = ""
        for t in range(tokens):
            text += f"token{t} "
            status = "done" if t == tokens - 1 else "streaming"
            value = {"role": "assistant", "text": text, "status": status}
            operation = "insert" if t == 0 else "update"
            appends.append([change("message", f"a{n}", operation, value)])
    appends.append([change("message", "u0", "delete")])
    return appends


async def read_messages(client: AppClient, offset: str = "-1") -> tuple[list[Any], int]:
    """Every message from ``offset`` on, and the bytes downloaded for them."""
    messages: list[Any] = []
    downloaded = 0
    while True:
        async with client.get(S, params={"offset": offset}) as response:
            assert response.status == 200, await response.text()
            body = await response.read()
            downloaded += len(body)
            messages += json.loads(body)
            offset = response.headers["Stream-Next-Offset"]
            if response.headers.get("Stream-Up-To-Date") == "true":
                return messages, downloaded


async def write(client: AppClient, appends: list[list[dict[str, Any]]]) -> None:
    assert (await client.put(S, headers=JSON)).status == 201
    for body in appends:
        response = await client.post(S, data=json.dumps(body), headers=JSON)
        assert response.status == 204, await response.text()


async def test_a_late_reader_downloads_the_live_rows_not_the_history(client: AppClient) -> None:
    await write(client, chat_history(replies=5, tokens=40))
    history, before = await read_messages(client)
    rows = fold(history)

    async with client.put(S, headers=COMPACT) as response:
        assert response.status == 200, await response.text()
        horizon = response.headers["Stream-Retained-From"]
        assert "messages=207" in response.headers["Stream-Compacted"]
    late, after = await read_messages(client)
    assert fold(late) == rows  # the same live rows...
    assert late[0] == {"headers": {"control": "snapshot-start"}}
    assert late[-1] == {"headers": {"control": "snapshot-end"}}
    assert len(late) == len(rows) + 2  # ...and nothing of the history
    assert after * 10 < before
    print(f"\nlate reader of a 5-reply chat: {before:,} B before compaction, {after:,} B after")

    gone = await client.get(S, params={"offset": format_offset(0)})
    assert gone.status == 410  # before the horizon: start again from -1
    assert gone.headers["Stream-Retained-From"] == horizon


async def test_a_live_reader_keeps_the_same_rows_across_a_compaction(client: AppClient) -> None:
    appends = chat_history(replies=2, tokens=5)
    await write(client, appends)
    seen, _ = await read_messages(client)
    async with client.head(S) as head:
        tail = head.headers["Stream-Next-Offset"]
    poll = asyncio.create_task(
        client.get(S, params={"offset": tail, "live": "long-poll"})  # parked at the tail
    )
    hub = client.app[CONTEXT].hub
    await wait_for(lambda: hub.parked_readers >= 1, what="the long-poll to park")
    assert (await client.put(S, headers=COMPACT)).status == 200
    response = await asyncio.wait_for(poll, 10)
    assert response.status == 200
    woken = json.loads(await response.read())
    assert woken[0] == {"headers": {"control": "snapshot-start"}}
    rows = fold(seen)
    held = dict(rows)
    for message in woken:  # applied as StreamDB does: an insert of a held row replaces it
        if "type" in message:
            held[(message["type"], message["key"])] = message["value"]
    assert held == rows  # no row twice, none changed
    more = change("message", "u9", "insert", {"role": "user", "text": "after"})
    assert (await client.post(S, data=json.dumps(more), headers=JSON)).status == 204
    assert fold((await read_messages(client))[0]) == {**rows, ("message", "u9"): more["value"]}


async def test_compacting_twice_keeps_one_snapshot(client: AppClient) -> None:
    await write(client, chat_history(replies=1, tokens=3))
    assert (await client.put(S, headers=COMPACT)).status == 200
    first, size = await read_messages(client)
    assert (await client.put(S, headers=COMPACT)).status == 200
    second, size_again = await read_messages(client)
    assert fold(second) == fold(first) and size_again == size


async def test_what_cannot_be_folded_is_refused_and_left_alone(client: AppClient) -> None:
    text = "/v1/stream/notes"
    assert (await client.put(text, headers={"Content-Type": "text/plain"})).status == 201
    refused = await client.put(text, headers=COMPACT)
    assert refused.status == 409
    assert (await refused.json())["error"]["code"] == "not_state_protocol"

    await write(client, [[{"not": "a change"}]])
    refused = await client.put(S, headers=COMPACT)
    assert refused.status == 409
    assert (await refused.json())["error"]["code"] == "not_state_protocol"
    assert (await read_messages(client))[0] == [{"not": "a change"}]  # nothing moved

    bad = await client.put(S, headers={"Stream-Compact": "everything"})
    assert bad.status == 400
    missing = await client.put("/v1/stream/nowhere", headers=COMPACT)
    assert missing.status == 404
