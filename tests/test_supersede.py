"""Superseding a stream ("regenerate from here", a correction a late reader must not see):
fork a successor at the last good offset, append the corrected continuation, then close the
old stream naming it with ``Stream-Successor``. Every read of the old stream then carries
``Link: <successor>; rel="successor-version"``; the old branch stays readable."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

import asyncpg
import pytest
from pytest_aiohttp import AiohttpClient

from relay.app import make_app
from relay.config import Config
from tests.serving import AppClient
from tests.stores import Backend, backend

__all__ = ["backend"]  # the fixture, imported so pytest finds it here

TEXT = {"Content-Type": "text/plain"}
OLD, NEW = "/v1/stream/chat/1/reply-a", "/v1/stream/chat/1/reply-b"
LINK = f'<{NEW}>; rel="successor-version"'
HAND_OVER = {"Stream-Closed": "true", "Stream-Successor": NEW}  # close, naming the successor


async def stored_bytes(backend: Backend, url: str) -> bytes:
    """Every byte the database itself holds for the own rows of the stream at ``url``, queried
    directly (stores key streams by their name, the path after ``/v1/stream/``)."""
    path = url.removeprefix("/v1/stream/")
    if backend.url is None:
        conn = sqlite3.connect(backend.data_dir / "relay.sqlite3")
        try:
            rows = conn.execute(
                "SELECT c.data FROM chunks c JOIN streams s ON s.id = c.stream_id "
                "WHERE s.path = ? ORDER BY c.start_pos",
                (path,),
            ).fetchall()
        finally:
            conn.close()
    else:
        pg = await asyncpg.connect(backend.url)
        try:
            rows = await pg.fetch(
                "SELECT c.data FROM relay_chunks c JOIN relay_streams s ON s.id = c.stream_id "
                "WHERE s.path = $1 ORDER BY c.start_pos",
                path,
            )
        finally:
            await pg.close()
    return b"".join(bytes(row[0]) for row in rows)


@pytest.fixture
async def client(backend: Backend, aiohttp_client: AiohttpClient) -> AppClient:
    config = Config(data_dir=str(backend.data_dir), database_url=backend.url or "")
    return await aiohttp_client(make_app(config))


async def _post(
    client: AppClient, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    async with client.post(path, data=body, headers={**TEXT, **(headers or {})}) as response:
        return response.status, dict(response.headers), await response.text()


async def test_regenerate_from_here_forks_continues_and_links_the_old_reply(
    client: AppClient,
) -> None:
    assert (await client.put(OLD, headers=TEXT)).status == 201
    await _post(client, OLD, b"The capital is ")
    good = (await client.head(OLD)).headers["Stream-Next-Offset"]
    await _post(client, OLD, b"Lyon.")  # the part to regenerate
    fork = {**TEXT, "Stream-Forked-From": OLD, "Stream-Fork-Offset": good}
    assert (await client.put(NEW, headers=fork)).status == 201
    await _post(client, NEW, b"Paris.")
    status, _, _ = await _post(client, OLD, headers=HAND_OVER)
    assert status == 204

    for response in (
        await client.get(OLD, params={"offset": "-1"}),
        await client.head(OLD),
        await client.get(OLD, params={"offset": "-1", "live": "long-poll"}),
        await client.get(OLD, params={"offset": "-1", "live": "sse"}),
    ):
        assert response.headers["Link"] == LINK
        assert response.headers["Stream-Successor"] == NEW
        assert "Link" in response.headers.get("Access-Control-Expose-Headers", "Link")
    old = await client.get(OLD, params={"offset": "-1"})
    assert await old.text() == "The capital is Lyon."  # the old branch stays readable
    new = await client.get(NEW, params={"offset": "-1"})
    assert await new.text() == "The capital is Paris."
    assert "Link" not in new.headers

    # The same successor again is an idempotent repeat; another one is refused.
    again = await _post(client, OLD, headers=HAND_OVER)
    assert again[0] == 204
    assert (await client.put("/v1/stream/chat/1/reply-c", headers=TEXT)).status == 201
    other = await _post(
        client, OLD, headers={"Stream-Closed": "true", "Stream-Successor": "chat/1/reply-c"}
    )
    assert other[0] == 409 and "successor_conflict" in other[2]


async def test_a_finished_reply_can_name_its_successor_later(client: AppClient) -> None:
    """The common chat case: the reply closed when the model finished; the user regenerates."""
    assert (await client.put(OLD, headers=TEXT)).status == 201
    await _post(client, OLD, b"done", headers={"Stream-Closed": "true"})
    assert (await client.put(NEW, headers=TEXT)).status == 201
    status, headers, _ = await _post(client, OLD, headers=HAND_OVER)
    assert status == 204 and headers["Stream-Closed"] == "true"
    read = await client.get(OLD, params={"offset": "-1"})
    assert read.headers["Link"] == LINK and await read.text() == "done"
    late = await _post(client, OLD, b"more", headers=HAND_OVER)
    assert late[0] == 409  # data after the close is refused as ever


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param({"Stream-Successor": NEW}, "successor_without_close", id="without-close"),
        pytest.param(
            {"Stream-Closed": "true", "Stream-Successor": "chat/1/missing"},
            "invalid_successor",
            id="missing-successor",
        ),
        pytest.param(
            {"Stream-Closed": "true", "Stream-Successor": OLD}, "invalid_successor", id="itself"
        ),
        pytest.param(
            {"Stream-Closed": "true", "Stream-Successor": "../etc"}, "invalid_path", id="bad-path"
        ),
    ],
)
async def test_a_bad_successor_is_a_clear_400_and_changes_nothing(
    client: AppClient, headers: dict[str, str], code: str
) -> None:
    assert (await client.put(OLD, headers=TEXT)).status == 201
    assert (await client.put(NEW, headers=TEXT)).status == 201
    status, _, body = await _post(client, OLD, headers=headers)
    assert status == 400 and code in body
    head = await client.head(OLD)
    assert "Stream-Closed" not in head.headers and "Link" not in head.headers


async def test_revoking_a_superseded_reply_erases_what_no_fork_inherits(
    client: AppClient, backend: Backend
) -> None:
    """Moderation or PII: supersede, then delete the old stream. Its successor (a fork)
    inherits the good prefix, so the old stream is soft-deleted (410 for everyone) and every
    byte past what any fork inherits is erased from the database, not just hidden."""
    assert (await client.put(OLD, headers=TEXT)).status == 201
    await _post(client, OLD, b"Your card is ")
    good = (await client.head(OLD)).headers["Stream-Next-Offset"]
    await _post(client, OLD, b"4111-1111-SECRET")  # same commit batch or not: one row or two
    await _post(client, OLD, b" and more SECRET")
    fork = {**TEXT, "Stream-Forked-From": OLD, "Stream-Fork-Offset": good}
    assert (await client.put(NEW, headers=fork)).status == 201
    await _post(client, NEW, b"[redacted]")
    await _post(client, OLD, headers=HAND_OVER)
    assert b"SECRET" in await stored_bytes(backend, OLD)

    assert (await client.delete(OLD)).status == 204
    assert (await client.get(OLD, params={"offset": "-1"})).status == 410
    assert await stored_bytes(backend, OLD) == b"Your card is "  # only the inherited prefix
    new = await client.get(NEW, params={"offset": "-1"})
    assert await new.text() == "Your card is [redacted]"
    assert (await client.delete(NEW)).status == 204  # the last fork: everything goes
    assert await stored_bytes(backend, OLD) == b""


async def test_revoking_bytes_a_fork_inherits_is_refused_unless_that_fork_goes_too(
    client: AppClient, backend: Backend
) -> None:
    assert (await client.put(OLD, headers=TEXT)).status == 201
    await _post(client, OLD, b"good ")
    good = (await client.head(OLD)).headers["Stream-Next-Offset"]
    await _post(client, OLD, b"PII")
    fork = {**TEXT, "Stream-Forked-From": OLD}
    assert (await client.put(NEW, headers={**fork, "Stream-Fork-Offset": good})).status == 201
    leak = "/v1/stream/chat/1/copy"  # forked at the tail: it inherits the PII
    assert (await client.put(leak, headers=fork)).status == 201
    deeper = {**TEXT, "Stream-Forked-From": leak}
    assert (await client.put("/v1/stream/chat/1/copy-2", headers=deeper)).status == 201

    revoke = {"Stream-Revoke-From": good}
    for unclear in ({**revoke, "Stream-Revoke-Forks": "yes"}, {"Stream-Revoke-Forks": "true"}):
        answer = await client.delete(OLD, headers=unclear)  # a DELETE never guesses: 400
        assert answer.status == 400, unclear
    refused = await client.delete(OLD, headers=revoke)
    assert refused.status == 409
    body = await refused.text()
    assert "inherited_by_fork" in body and "copy" in body and "reply-b" not in body
    assert (await client.get(OLD, params={"offset": "-1"})).status == 200  # nothing changed

    gone = await client.delete(OLD, headers={**revoke, "Stream-Revoke-Forks": "true"})
    assert gone.status == 204
    for path in (leak, "/v1/stream/chat/1/copy-2"):
        assert (await client.head(path)).status == 404
    assert (await client.get(OLD, params={"offset": "-1"})).status == 410
    assert await stored_bytes(backend, OLD) == b"good "
    assert await (await client.get(NEW, params={"offset": "-1"})).text() == "good "
