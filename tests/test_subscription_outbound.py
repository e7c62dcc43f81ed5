"""The outbound webhook client refuses what 12.8 forbids at connect time, against the
addresses a name really resolves to, and bounds what a receiver can hold."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from protocol.subscriptions import UrlPolicy
from relay.subscriptions.outbound import MAX_RESPONSE_BYTES, Outbound, Refused
from tests.webhook_receiver import Received, Receiver


class FakeDns(AbstractResolver):
    """Answers every name with one fixed address, as a hostile DNS server might."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [
            ResolveResult(hostname=host, host=self.address, port=port, family=fam, proto=0, flags=0)
        ]

    async def close(self) -> None:
        pass


async def client(
    dns: AbstractResolver | None = None, policy: UrlPolicy | None = None, timeout: float = 5
) -> Outbound:
    out = Outbound(policy or UrlPolicy(), timeout=timeout, concurrency=4, resolver=dns)
    await out.open()
    return out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as r:
        yield r


@pytest.mark.parametrize("address", ["10.0.0.5", "169.254.169.254", "127.0.0.1", "::1", "fd00::1"])
async def test_a_public_name_resolving_to_a_local_address_is_refused(address: str) -> None:
    dns = FakeDns(address)
    out = await client(dns)
    try:
        with pytest.raises(Refused):
            await out.post("https://hooks.example.com/x", b"{}", {})
        assert dns.asked == ["hooks.example.com"]  # refused after resolving, before connecting
    finally:
        await out.close()


async def test_localhost_must_resolve_to_loopback(receiver: Receiver) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    rebound = await client(FakeDns("10.0.0.1"))
    local = await client(FakeDns("127.0.0.1"))
    try:
        with pytest.raises(Refused):
            await rebound.post(f"http://localhost:{port}/hook", b"{}", {})
        reply = await local.post(f"http://localhost:{port}/hook", b"{}", {})
        assert reply.status == 200 and len(receiver.received) == 1
    finally:
        await rebound.close()
        await local.close()


@pytest.mark.parametrize(
    "url", ["https://10.0.0.1/x", "https://[::ffff:10.0.0.1]/x", "http://192.168.1.1/x"]
)
async def test_literal_local_addresses_are_refused_at_send_time(url: str) -> None:
    out = await client()
    try:
        with pytest.raises(Refused):
            await out.post(url, b"{}", {})
    finally:
        await out.close()


async def test_operator_can_forbid_loopback(receiver: Receiver) -> None:
    out = await client(policy=UrlPolicy(allow_loopback=False))
    try:
        with pytest.raises(Refused):
            await out.post(receiver.url, b"{}", {})
        assert receiver.received == []
    finally:
        await out.close()


async def test_response_bodies_are_capped() -> None:
    async def huge(_: Received, __: int) -> web.StreamResponse:
        return web.Response(body=b"x" * (4 * MAX_RESPONSE_BYTES))

    async with Receiver(huge) as r:
        out = await client()
        try:
            reply = await out.post(r.url, b"{}", {})
        finally:
            await out.close()
    assert reply.status == 200 and len(reply.body) == MAX_RESPONSE_BYTES


async def test_a_receiver_that_never_answers_is_cut_off() -> None:
    never = asyncio.Event()

    async def hang(_: Received, __: int) -> web.StreamResponse:
        await never.wait()
        return web.json_response({})

    async with Receiver(hang) as r:
        out = await client(timeout=0.5)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await out.post(r.url, b"{}", {})
        finally:
            never.set()
            await out.close()
