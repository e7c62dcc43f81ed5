"""The retention horizon: ``PUT`` with ``Stream-Retain-From`` (admin) advances where a stream's
retained data starts. Reads before it are 410 with the horizon and ``no-store``, ``offset=-1``
starts at it, HEAD names it, forks before it are refused and forks inherit it, and the rows
before it that no fork can read are deleted, on both stores."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from pytest_aiohttp import AiohttpClient

from protocol.offsets import format_offset
from relay.app import make_app
from relay.config import Config
from relay.http.context import CONTEXT, Context
from tests.serving import AppClient
from tests.stores import Backend, backend

__all__ = ["backend"]  # the fixture, imported so pytest finds it here

TEXT = {"Content-Type": "text/plain"}
JSON = {"Content-Type": "application/json"}
S = "/v1/stream/history"
NAME = "history"  # how the store keys it: the path after /v1/stream/


@pytest.fixture
async def client(backend: Backend, aiohttp_client: AiohttpClient) -> AppClient:
    config = Config(data_dir=str(backend.data_dir), database_url=backend.url or "")
    return await aiohttp_client(make_app(config))


def ctx_of(client: AppClient) -> Context:
    return client.app[CONTEXT]


async def retain(client: AppClient, path: str, position: int) -> tuple[int, dict[str, str]]:
    headers = {"Stream-Retain-From": format_offset(position)}
    async with client.put(path, headers=headers) as response:
        return response.status, dict(response.headers)


async def text_stream(client: AppClient) -> None:
    assert (await client.put(S, headers=TEXT)).status == 201
    for part in (b"aaaa", b"bbbb", b"cccc"):  # one commit, so one row, each
        assert (await client.post(S, data=part, headers=TEXT)).status == 204


async def test_reads_before_the_horizon_are_gone_and_minus_one_starts_at_it(
    client: AppClient,
) -> None:
    await text_stream(client)
    status, headers = await retain(client, S, 8)
    assert status == 200 and headers["Stream-Retained-From"] == format_offset(8)
    assert headers["Cache-Control"] == "no-store"

    start = await client.get(S, params={"offset": "-1"})
    assert await start.read() == b"cccc"
    assert start.headers["Stream-Next-Offset"] == format_offset(12)
    assert (await client.get(S, params={"offset": format_offset(8)})).status == 200
    for position in (0, 4, 7):
        for live in (None, "long-poll", "sse"):
            params = {"offset": format_offset(position), **({"live": live} if live else {})}
            gone = await client.get(S, params=params)
            assert gone.status == 410, (position, live)
            assert gone.headers["Stream-Retained-From"] == format_offset(8)
            assert gone.headers["Cache-Control"] == "no-store"
            assert (await gone.json())["error"]["code"] == "gone"
    head = await client.head(S)
    assert head.headers["Stream-Retained-From"] == format_offset(8)

    # The rows before it are gone from the store itself, not just hidden.
    ctx = ctx_of(client)
    meta = await ctx.store.head(NAME, ctx.clock(), touch=False)
    stored = await ctx.store.read(replace(meta, retained_from=0), 0, 12)
    assert stored == b"cccc"


async def test_the_horizon_only_moves_forward_within_the_stream(client: AppClient) -> None:
    await text_stream(client)
    assert (await retain(client, S, 8))[0] == 200
    assert (await retain(client, S, 8))[0] == 200  # an idempotent repeat
    assert (await retain(client, S, 4))[0] == 409
    assert (await retain(client, S, 13))[0] == 400
    assert (await retain(client, "/v1/stream/missing", 0))[0] == 404
    with_body = await client.put(S, data=b"x", headers={"Stream-Retain-From": format_offset(8)})
    assert with_body.status == 400


async def test_forks_before_the_horizon_are_refused_and_forks_inherit_it(
    client: AppClient,
) -> None:
    await text_stream(client)
    early = {**TEXT, "Stream-Forked-From": S, "Stream-Fork-Offset": format_offset(6)}
    assert (await client.put("/v1/stream/early", headers=early)).status == 201
    assert (await retain(client, S, 8))[0] == 200
    # A fork made before keeps its whole prefix: those rows were not deleted.
    kept = await client.get("/v1/stream/early", params={"offset": "-1"})
    assert await kept.read() == b"aaaabb"

    before = {**TEXT, "Stream-Forked-From": S, "Stream-Fork-Offset": format_offset(4)}
    refused = await client.put("/v1/stream/late", headers=before)
    assert refused.status == 409 and "fork_before_retention" in await refused.text()
    after = {**TEXT, "Stream-Forked-From": S, "Stream-Fork-Offset": format_offset(10)}
    assert (await client.put("/v1/stream/late", headers=after)).status == 201
    late = await client.get("/v1/stream/late", params={"offset": "-1"})
    assert await late.read() == b"cc"  # from the inherited horizon
    assert (await client.get("/v1/stream/late", params={"offset": format_offset(0)})).status == 410


async def test_a_json_horizon_falls_on_a_message_boundary(client: AppClient) -> None:
    assert (await client.put(S, headers=JSON)).status == 201
    assert (await client.post(S, data=b'[{"a":1},{"b":2}]', headers=JSON)).status == 204
    assert (await retain(client, S, 3))[0] == 400  # inside the first message
    assert (await retain(client, S, len(b'{"a":1}\n')))[0] == 200
    read = await client.get(S, params={"offset": "-1"})
    assert await read.json() == [{"b": 2}]


async def test_a_state_stream_compacts_to_a_snapshot_and_a_late_reader_gets_only_it(
    client: AppClient,
) -> None:
    """The State Protocol's compaction (upstream #404): append a snapshot of the current rows,
    then retain from where it starts; a late StreamDB reader downloads only the snapshot."""
    changes = [
        {"type": "chat", "key": str(n), "value": {"title": f"t{n}"}, "headers": {"operation": op}}
        for n in range(20)
        for op in ("insert", "update")
    ]
    assert (await client.put(S, headers=JSON)).status == 201
    assert (await client.post(S, data=json.dumps(changes), headers=JSON)).status == 204
    snapshot_at = (await client.head(S)).headers["Stream-Next-Offset"]
    snapshot = [
        {"headers": {"control": "snapshot-start"}},
        *(
            {"type": "chat", "key": str(n), "value": {"title": f"t{n}"},
             "headers": {"operation": "insert"}}
            for n in range(20)
        ),
        {"headers": {"control": "snapshot-end"}},
    ]  # fmt: skip
    assert (await client.post(S, data=json.dumps(snapshot), headers=JSON)).status == 204
    headers = {"Stream-Retain-From": snapshot_at}
    assert (await client.put(S, headers=headers)).status == 200
    late = await (await client.get(S, params={"offset": "-1"})).json()
    assert late == snapshot
