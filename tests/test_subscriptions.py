"""Subscriptions over HTTP (sections 6-7), on every store: management, webhook delivery and
callbacks, pull-wake leases, fencing, retries, SSRF refusals and isolation between
receivers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from protocol.create import CreateRequest
from protocol.lifecycle import Expiry
from protocol.offsets import format_offset
from relay.app import make_app
from relay.config import Config
from relay.store.base import Store
from relay.store.postgres import PostgresStore
from relay.store.sqlite import SqliteStore
from tests.serving import RelayTestServer
from tests.stores import Backend, backend
from tests.waits import eventually
from tests.webhook_receiver import Received, Receiver, verify

__all__ = ["backend"]

JSON = {"Content-Type": "application/json"}


@dataclass
class Relay:
    base: str
    http: aiohttp.ClientSession

    def stream(self, path: str) -> str:
        return f"{self.base}/v1/stream/{path}"

    def sub(self, sub_id: str, tail: str = "") -> str:
        return f"{self.base}/v1/stream/__ds/subscriptions/{sub_id}{tail}"

    async def put_sub(self, sub_id: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.http.put(self.sub(sub_id), json=body) as r:
            return r.status, await r.json()

    async def get_sub(self, sub_id: str) -> dict[str, Any]:
        async with self.http.get(self.sub(sub_id)) as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
            return body

    async def post(self, url: str, body: Any, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.post(url, json=body, headers=headers) as r:
            return r.status, (await r.json() if r.status != 204 else None)

    async def create_stream(self, path: str, body: bytes | None = None) -> None:
        async with self.http.put(self.stream(path), data=body or b"", headers=JSON) as r:
            assert r.status == 201, await r.text()

    async def append(self, path: str, body: bytes) -> str:
        async with self.http.post(self.stream(path), data=body, headers=JSON) as r:
            assert r.status == 204, await r.text()
            return r.headers["Stream-Next-Offset"]

    async def jwks(self) -> dict[str, Any]:
        async with self.http.get(f"{self.base}/v1/stream/__ds/jwks.json") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("application/jwk-set+json")
            body: dict[str, Any] = await r.json()
            return body


def _store(backend: Backend) -> Store:
    return SqliteStore(backend.data_dir) if backend.url is None else PostgresStore(backend.url)


@pytest.fixture
async def relay(backend: Backend) -> AsyncIterator[Relay]:
    config = Config(data_dir=str(backend.data_dir), subscription_poll_interval=0.05)
    server = RelayTestServer(make_app(config, _store(backend)), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield Relay(f"http://127.0.0.1:{server.port}", http)
    finally:
        await server.close()


def hook(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "webhook", "webhook": {"url": url}, **extra}


# -- management (6.2-6.5) ---------------------------------------------------------------------


async def test_create_reconfirm_conflict_get_and_delete(relay: Relay) -> None:
    config = hook("http://127.0.0.1:9/hook", pattern="events/*", description="d")
    status, created = await relay.put_sub("s1", config)
    assert status == 201
    assert created["id"] == created["subscription_id"] == "s1"
    assert created["status"] == "active" and created["lease_ttl_ms"] == 30_000
    assert created["created_at"].endswith("Z")
    signing = created["webhook"]["signing"]
    assert signing["alg"] == "ed25519" and signing["kid"].startswith("ds_")
    assert signing["jwks_url"] == f"{relay.base}/v1/stream/__ds/jwks.json"
    assert [k["kid"] for k in (await relay.jwks())["keys"]] == [signing["kid"]]
    assert "secret" not in str(created)
    status, again = await relay.put_sub("s1", {**config, "lease_ttl_ms": 30_000})
    assert status == 200 and again["created_at"] == created["created_at"]
    status, conflict = await relay.put_sub("s1", {**config, "description": "other"})
    assert status == 409 and conflict["error"]["code"] == "SUBSCRIPTION_ALREADY_EXISTS"
    async with relay.http.delete(relay.sub("s1")) as r:
        assert r.status == 204
    async with relay.http.get(relay.sub("s1")) as r:
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"
    status, _ = await relay.put_sub("s1", {**config, "description": "other"})
    assert status == 201  # a tombstoned id can be created afresh


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (hook("http://10.0.0.1/hook", pattern="a"), "WEBHOOK_URL_REJECTED"),
        (hook("https://169.254.169.254/latest", pattern="a"), "WEBHOOK_URL_REJECTED"),
        (hook("http://[::1]:8080/hook", pattern="a"), "WEBHOOK_URL_REJECTED"),
        (hook("https://[fd00::1]/hook", pattern="a"), "WEBHOOK_URL_REJECTED"),
        (hook("https://hooks.example.com/", pattern="a", lease_ttl_ms=5), "INVALID_REQUEST"),
        ({"type": "pull-wake", "pattern": "a"}, "INVALID_REQUEST"),
    ],
)
async def test_bad_subscriptions_are_400(relay: Relay, body: Any, code: str) -> None:
    status, answer = await relay.put_sub("bad", body)
    assert status == 400 and answer["error"]["code"] == code
    async with relay.http.get(relay.sub("bad")) as r:
        assert r.status == 404


@pytest.mark.parametrize(
    ("method", "tail", "body", "status"),
    [
        ("PUT", "", b"{not json", 400),
        ("PUT", "", b"[]", 400),
        ("POST", "", b"{}", 405),
        ("POST", "/streams", b'{"streams": []}', 400),
        ("POST", "/claim", b'{"worker": 5}', 400),
        ("POST", "/callback", b"{}", 401),
        ("POST", "/nonsense", b"{}", 404),
        ("GET", "/../../x", b"", 404),
    ],
)
async def test_malformed_control_requests_are_4xx_json(
    relay: Relay, method: str, tail: str, body: bytes, status: int
) -> None:
    await relay.put_sub("m", hook("http://127.0.0.1:9/hook", pattern="a"))
    async with relay.http.request(method, relay.sub("m", tail), data=body, headers=JSON) as r:
        assert r.status == status
        if status != 405:
            assert "code" in (await r.json())["error"]


async def test_explicit_membership_and_glob_precedence(relay: Relay) -> None:
    await relay.create_stream("m/a", b'{"x":1}')
    await relay.put_sub("m", hook("http://127.0.0.1:9/hook", pattern="m/*", streams=["m/a"]))
    links = {s["path"]: s for s in (await relay.get_sub("m"))["streams"]}
    assert links["m/a"]["link_type"] == "explicit"  # explicit wins over the glob
    assert links["m/a"]["acked_offset"] != format_offset(0)  # linked at its tail
    status, _ = await relay.post(relay.sub("m", "/streams"), {"streams": ["other/x", "m/a"]})
    assert status == 204
    async with relay.http.delete(relay.sub("m", "/streams/m%2Fa")) as r:
        assert r.status == 204
    async with relay.http.delete(relay.sub("m", "/streams/other%2Fx")) as r:
        assert r.status == 204
    async with relay.http.delete(relay.sub("m", "/streams/never%2Flinked")) as r:
        assert r.status == 204
    links = {s["path"]: s for s in (await relay.get_sub("m"))["streams"]}
    assert links == {"m/a": {**links["m/a"], "link_type": "glob"}}  # the glob link remains


# -- webhook delivery (7.1) -------------------------------------------------------------------


async def test_webhook_is_signed_and_done_acks_the_snapshot(relay: Relay) -> None:
    async def done(_: Received, __: int) -> web.StreamResponse:
        return web.json_response({"done": True})

    async with Receiver(done) as receiver:
        await relay.create_stream("events/old", b'{"old":1}')
        await relay.put_sub("w", hook(receiver.url, pattern="events/*", lease_ttl_ms=1000))
        await relay.create_stream("events/new", b'{"n":1}')
        got = await receiver.wait_for(1)
        assert verify(got, await relay.jwks())
        body = got.body
        assert body["subscription_id"] == "w" and body["generation"] == 1
        assert body["wake_id"].startswith("w_")
        assert body["callback_url"] == relay.sub("w", "/callback")
        streams = {s["path"]: s for s in body["streams"]}
        assert streams["events/new"]["has_pending"] is True
        assert streams["events/new"]["acked_offset"] == format_offset(0)  # linked before it
        assert streams["events/old"]["has_pending"] is False  # backfilled at its tail
        tail = streams["events/new"]["tail_offset"]

        async def acked() -> bool:
            links = {s["path"]: s for s in (await relay.get_sub("w"))["streams"]}
            return bool(links["events/new"]["acked_offset"] == tail)

        await eventually(acked)
        await relay.append("events/new", b'{"n":2}')
        second = await receiver.wait_for(2)
        assert second.body["generation"] == 2 and second.body["wake_id"] != body["wake_id"]
    async with relay.http.get(f"{relay.base}/metrics") as r:
        text = await r.text()
    assert 'relay_subscription_deliveries_total{outcome="done",type="webhook"}' in text


async def test_callback_acks_fences_and_refuses_bad_tokens(relay: Relay) -> None:
    async with Receiver() as receiver:
        await relay.put_sub("c", hook(receiver.url, pattern="c/*"))
        await relay.put_sub("other", hook(receiver.url, streams=["nothing"]))
        await relay.create_stream("c/1", b'{"a":1}')
        body = (await receiver.wait_for(1)).body
        token, url = body["callback_token"], body["callback_url"]
        tail = body["streams"][0]["tail_offset"]
        ack = {"wake_id": body["wake_id"], "generation": body["generation"]}
        assert (await relay.post(url, ack, "forged." + token))[0] == 401
        assert (await relay.post(url, ack))[0] == 401
        status, answer = await relay.post(relay.sub("other", "/callback"), ack, token)
        assert status == 401  # a token is bound to its subscription
        status, answer = await relay.post(url, {**ack, "generation": 0}, token)
        assert status == 409 and answer["error"]["code"] == "FENCED"
        beyond = {**ack, "acks": [{"stream": "c/1", "offset": format_offset(10**9)}]}
        status, answer = await relay.post(url, beyond, token)
        assert status == 409 and answer["error"]["code"] == "INVALID_OFFSET"
        assert (await relay.post(url, ack, token)) == (200, {"ok": True, "next_wake": False})
        done = {**ack, "acks": [{"stream": "c/1", "offset": tail}], "done": True}
        assert (await relay.post(url, done, token)) == (200, {"ok": True, "next_wake": False})
        status, answer = await relay.post(url, done, token)
        assert status == 409 and answer["error"]["code"] == "FENCED"
        assert (await relay.get_sub("c"))["streams"][0]["acked_offset"] == tail


async def test_deleted_subscription_refuses_callbacks_and_keeps_cursors(relay: Relay) -> None:
    async with Receiver() as receiver:
        await relay.put_sub("d", hook(receiver.url, pattern="d/*"))
        await relay.create_stream("d/1", b'{"a":1}')
        body = (await receiver.wait_for(1)).body
        async with relay.http.delete(relay.sub("d")) as r:
            assert r.status == 204
        tail = body["streams"][0]["tail_offset"]
        done = {
            "wake_id": body["wake_id"],
            "generation": body["generation"],
            "acks": [{"stream": "d/1", "offset": tail}],
            "done": True,
        }
        status, answer = await relay.post(body["callback_url"], done, body["callback_token"])
        assert status == 404 and answer["error"]["code"] == "SUBSCRIPTION_NOT_FOUND"


async def test_expired_webhook_lease_wakes_again_with_a_new_generation(relay: Relay) -> None:
    async with Receiver() as receiver:  # answers {} and never calls back
        await relay.put_sub("l", hook(receiver.url, pattern="l/*", lease_ttl_ms=1000))
        await relay.create_stream("l/1", b'{"a":1}')
        first = (await receiver.wait_for(1)).body
        second = (await receiver.wait_for(2)).body
        assert second["generation"] == first["generation"] + 1
        ack = {"wake_id": first["wake_id"], "generation": first["generation"], "done": True}
        status, answer = await relay.post(first["callback_url"], ack, first["callback_token"])
        assert status == 409 and answer["error"]["code"] == "FENCED"


async def test_failed_deliveries_retry_with_backoff_and_report_failed(relay: Relay) -> None:
    async def flaky(_: Received, n: int) -> web.StreamResponse:
        if n <= 2:
            return web.Response(status=503)
        return web.json_response({"done": True})

    async with Receiver(flaky) as receiver:
        await relay.put_sub("r", hook(receiver.url, pattern="r/*"))
        await relay.create_stream("r/1", b'{"a":1}')
        await receiver.wait_for(1)

        async def failed() -> bool:
            return bool((await relay.get_sub("r"))["status"] == "failed")

        await eventually(failed)
        third = await receiver.wait_for(3)
        assert {r.body["wake_id"] for r in receiver.received} == {third.body["wake_id"]}

        async def active() -> bool:
            return bool((await relay.get_sub("r"))["status"] == "active")

        await eventually(active)
    async with relay.http.get(f"{relay.base}/metrics") as r:
        text = await r.text()
    assert "relay_subscription_retries_total 2.0" in text


async def test_redirects_are_not_followed(relay: Relay) -> None:
    async with Receiver() as target:

        async def redirect(_: Received, __: int) -> web.StreamResponse:
            return web.Response(status=307, headers={"Location": target.url})

        async with Receiver(redirect) as receiver:
            await relay.put_sub("x", hook(receiver.url, pattern="x/*"))
            await relay.create_stream("x/1", b'{"a":1}')
            await receiver.wait_for(2)  # retried, as a failure
            assert target.received == []
            assert (await relay.get_sub("x"))["status"] == "failed"


async def test_a_slow_receiver_does_not_delay_another_subscription(relay: Relay) -> None:
    release = asyncio.Event()

    async def stuck(_: Received, __: int) -> web.StreamResponse:
        await release.wait()
        return web.json_response({})

    async with Receiver(stuck) as slow, Receiver() as fast:
        await relay.put_sub("slow", hook(slow.url, pattern="slow/*"))
        await relay.put_sub("fast", hook(fast.url, pattern="fast/*"))
        await relay.create_stream("slow/1", b'{"a":1}')
        await slow.wait_for(1)
        await relay.create_stream("fast/1", b'{"a":1}')
        await fast.wait_for(1)
        assert slow.in_flight == 1  # the slow call is still open
        release.set()


# -- pull-wake (7.2) --------------------------------------------------------------------------


async def wake_events(relay: Relay, path: str) -> list[dict[str, Any]]:
    async with relay.http.get(relay.stream(path) + "?offset=-1") as r:
        events: list[dict[str, Any]] = await r.json()
        return events


async def test_pull_wake_claim_heartbeat_ack_release(relay: Relay) -> None:
    await relay.create_stream("wake/pool", b"[]")
    body = {"type": "pull-wake", "pattern": "p/*", "wake_stream": "wake/pool", "lease_ttl_ms": 1000}
    assert (await relay.put_sub("p", body))[0] == 201
    status, answer = await relay.post(relay.sub("p", "/claim"), {"worker": "w1"})
    assert status == 409 and answer["error"]["code"] == "NO_PENDING_WORK"
    await relay.create_stream("p/1", b'{"a":1}')

    async def woken() -> list[dict[str, Any]]:
        return await wake_events(relay, "wake/pool")

    events = await eventually(woken)
    assert events[0] == {**events[0], "type": "wake", "subscription_id": "p", "stream": "p/1"}
    status, claim = await relay.post(relay.sub("p", "/claim"), {"worker": "w1"})
    assert status == 200 and claim["generation"] == events[0]["generation"]
    status, busy = await relay.post(relay.sub("p", "/claim"), {"worker": "w2"})
    assert status == 409 and busy["error"]["code"] == "ALREADY_CLAIMED"
    assert busy["error"]["current_holder"] == "w1"
    assert busy["error"]["generation"] == claim["generation"]
    wake = {"wake_id": claim["wake_id"], "generation": claim["generation"]}
    ack_url, token = relay.sub("p", "/ack"), claim["token"]
    for _ in range(3):  # heartbeats keep the 1 s lease past its first expiry
        await asyncio.sleep(0.5)  # a sleep: the lease runs on the relay's real clock
        assert (await relay.post(ack_url, wake, token)) == (200, {"ok": True, "next_wake": False})
    await relay.append("p/1", b'{"a":2}')
    tail = claim["streams"][0]["tail_offset"]
    done = {**wake, "acks": [{"stream": "p/1", "offset": tail}], "done": True}
    assert (await relay.post(ack_url, done, token)) == (200, {"ok": True, "next_wake": True})
    status, answer = await relay.post(relay.sub("p", "/release"), wake, token)
    assert status == 409 and answer["error"]["code"] == "FENCED"
    status, claim2 = await relay.post(relay.sub("p", "/claim"), {"worker": "w2"})
    assert status == 200 and claim2["generation"] == claim["generation"] + 1
    wake2 = {"wake_id": claim2["wake_id"], "generation": claim2["generation"]}
    assert (await relay.post(relay.sub("p", "/release"), wake2, claim2["token"])) == (204, None)

    async def rewoken() -> bool:
        events = await wake_events(relay, "wake/pool")
        return any(e["generation"] > claim2["generation"] for e in events)

    await eventually(rewoken)  # released with work pending: a new wake event


async def test_expired_pull_lease_fences_the_old_worker(relay: Relay) -> None:
    await relay.create_stream("wake/q", b"[]")
    body = {"type": "pull-wake", "streams": ["q/1"], "wake_stream": "wake/q", "lease_ttl_ms": 1000}
    await relay.put_sub("q", body)
    await relay.create_stream("q/1", b'{"a":1}')
    status, claim = await relay.post(relay.sub("q", "/claim"), {"worker": "w1"})
    assert status == 200

    async def reclaimed() -> dict[str, Any] | None:
        status, again = await relay.post(relay.sub("q", "/claim"), {"worker": "w2"})
        return again if status == 200 else None

    again = await eventually(reclaimed)
    assert again["generation"] > claim["generation"]
    wake = {"wake_id": claim["wake_id"], "generation": claim["generation"], "done": True}
    status, answer = await relay.post(relay.sub("q", "/ack"), wake, claim["token"])
    assert status == 409 and answer["error"]["code"] == "FENCED"


# -- durability -------------------------------------------------------------------------------


async def test_subscriptions_and_signing_keys_survive_a_restart(backend: Backend) -> None:
    config = Config(data_dir=str(backend.data_dir), subscription_poll_interval=0.05)
    kids = []
    for round_ in range(2):
        server = RelayTestServer(make_app(config, _store(backend)), host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                relay = Relay(f"http://127.0.0.1:{server.port}", http)
                if round_ == 0:
                    await relay.put_sub("keep", hook("http://127.0.0.1:9/h", pattern="k/*"))
                view = await relay.get_sub("keep")
                kids.append(view["webhook"]["signing"]["kid"])
        finally:
            await server.close()
    assert kids[0] == kids[1]


async def test_key_rotation_publishes_both_keys_and_signs_with_the_new_one(
    relay: Relay, backend: Backend
) -> None:
    from relay import cli

    old = [k["kid"] for k in (await relay.jwks())["keys"]]
    where = (
        ["--database-url", backend.url] if backend.url else ["--data-dir", str(backend.data_dir)]
    )
    assert await asyncio.to_thread(cli.main, ["rotate-webhook-key", *where]) == 0

    async def rotated() -> list[str]:
        kids = [k["kid"] for k in (await relay.jwks())["keys"]]
        return kids if len(kids) == 2 else []

    kids = await eventually(rotated)
    assert kids[0] == old[0] and kids[1] != old[0]  # the old key is still published
    async with Receiver() as receiver:
        await relay.put_sub("rot", hook(receiver.url, pattern="rot/*"))
        assert (await relay.get_sub("rot"))["webhook"]["signing"]["kid"] == kids[1]
        await relay.create_stream("rot/1", b'{"a":1}')
        got = await receiver.wait_for(1)
        assert got.signature is not None and f"kid={kids[1]}," in got.signature
        assert verify(got, await relay.jwks())


async def test_concurrent_creates_through_two_relays_agree(pg_url: str, tmp_path: Any) -> None:
    """Two relays on one database, the same PUT racing through both: one 201, the rest 200."""
    servers = []
    try:
        for name in ("a", "b"):
            config = Config(data_dir=str(tmp_path / name), database_url=pg_url)
            server = RelayTestServer(make_app(config, PostgresStore(pg_url)), host="127.0.0.1")
            await server.start_server()
            servers.append(server)
        body = hook("http://127.0.0.1:9/hook", pattern="race/*")
        async with aiohttp.ClientSession() as http:

            async def put(server: RelayTestServer) -> int:
                url = f"http://127.0.0.1:{server.port}/v1/stream/__ds/subscriptions/race"
                async with http.put(url, json=body) as r:
                    return r.status

            statuses = await asyncio.gather(*(put(servers[i % 2]) for i in range(6)))
        assert sorted(statuses) == [200] * 5 + [201]
    finally:
        for server in servers:
            await server.close()


async def test_a_stream_deleted_and_created_again_starts_its_cursor_over(relay: Relay) -> None:
    async def done(_: Received, __: int) -> web.StreamResponse:
        return web.json_response({"done": True})

    async with Receiver(done) as receiver:
        await relay.put_sub("again", hook(receiver.url, pattern="again/*"))
        await relay.create_stream("again/1", b'{"long":"first incarnation"}')
        await receiver.wait_for(1)

        async def acked(offset: str) -> bool:
            links = (await relay.get_sub("again"))["streams"]
            return bool(links and links[0]["acked_offset"] == offset)

        first_tail = (await receiver.wait_for(1)).body["streams"][0]["tail_offset"]
        await eventually(lambda: acked(first_tail))
        async with relay.http.delete(relay.stream("again/1")) as r:
            assert r.status == 204
        await relay.create_stream("again/1", b'{"s":2}')  # shorter than the old cursor
        woken = (await receiver.wait_for(2)).body
        stream = woken["streams"][0]
        assert stream["acked_offset"] == format_offset(0) and stream["has_pending"]
        await eventually(lambda: acked(stream["tail_offset"]))


async def test_each_delivery_attempt_logs_one_line_without_secrets(relay: Relay) -> None:
    from structlog.testing import capture_logs

    async with Receiver() as receiver:
        await relay.put_sub("log", hook(receiver.url, pattern="log/*"))
        with capture_logs() as logs:
            await relay.create_stream("log/1", b'{"a":1}')
            got = await receiver.wait_for(1)

            async def logged() -> list[MutableMapping[str, Any]]:
                return [e for e in logs if e["event"] == "subscription delivery"]

            lines = await eventually(logged)
    line = lines[0]
    assert line["subscription_id"] == "log" and line["host"] == "127.0.0.1"
    assert line["attempt"] == 1 and line["outcome"] == "ok" and line["status"] == "200"
    assert isinstance(line["ms"], float)
    assert got.body["callback_token"] not in str(lines)


async def test_control_bodies_are_read_whole_and_bounded(relay: Relay) -> None:
    """A body arriving in pieces is parsed whole, not as its first piece; one past 1 MiB is 413."""

    async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0.05)  # each piece its own read on the server

    slow = pieces(b'{"type": "pull-wake", ', b'"pattern": "a/*", "wake_stream": "w/x"}')
    async with relay.http.put(relay.sub("whole"), data=slow, headers=JSON) as r:
        assert r.status == 201, await r.text()
    big = pieces(b'{"type": "pull-wake", ', b" " * (1024 * 1024), b'"pattern": "a/*"}')
    async with relay.http.put(relay.sub("big"), data=big, headers=JSON) as r:
        assert r.status == 413
        assert (await r.json())["error"]["code"]


async def test_a_stream_another_relay_created_is_linked_beside_existing_links(
    pg_url: str, tmp_path: Any
) -> None:
    """A stream this relay's append hook never saw (created through another relay) is found
    by the sweep even when the subscription already has links: the sweep's "not linked yet"
    test compares the link's path with the stream's, not with itself."""
    config = Config(data_dir=str(tmp_path / "a"), database_url=pg_url)
    server = RelayTestServer(make_app(config, PostgresStore(pg_url)), host="127.0.0.1")
    other = PostgresStore(pg_url)  # another relay's store: no hook of this relay hears it
    await server.start_server()
    await other.open()
    try:
        base = f"http://127.0.0.1:{server.port}/v1/stream/"
        async with aiohttp.ClientSession() as http:
            sub = f"{base}__ds/subscriptions/late"
            async with http.put(sub, json=hook("http://127.0.0.1:9/hook", pattern="late/*")) as r:
                assert r.status == 201

            async def linked(*paths: str) -> bool:
                async with http.get(sub) as r:
                    return {link["path"] for link in (await r.json())["streams"]} == set(paths)

            async with http.put(f"{base}late/1", headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 201
            await eventually(lambda: linked("late/1"))  # by this relay's append hook
            request = CreateRequest("late/2", "text/plain", Expiry(), False, b"")
            await other.create(request, time.time())
            await eventually(lambda: linked("late/1", "late/2"))  # by the sweep
    finally:
        await other.close()
        await server.close()
