"""Outbound webhook calls that a hostile subscriber cannot turn against the relay's network.

The URL is checked at registration and again before each call (:func:`check_webhook_url`),
and every address a host name resolves to is checked at connect time by the resolver the
connection really uses (no DNS cache), so a name that later rebinds to a private address is
refused. Redirects are not followed; connect and total timeouts, a response size cap and a
global limit on calls in flight bound what one slow or hostile receiver can hold.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from protocol import subscriptions as rules

MAX_RESPONSE_BYTES = 64 * 1024


class Refused(Exception):
    """The target is not allowed (policy, or an address it resolved to)."""


class GuardedResolver(AbstractResolver):
    """Resolves through ``inner`` and refuses the host if any address is not allowed."""

    def __init__(self, policy: rules.UrlPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        name = host.lower()
        loopback_ok = name in rules.LOCALHOST_NAMES and self._policy.allow_loopback
        target = rules.WebhookTarget("", name, port, False, loopback_ok)
        for result in results:
            if not rules.address_allowed(target, result["host"]):
                raise Refused(f"{host} resolves to a forbidden address")
        if not results:
            raise Refused(f"{host} did not resolve")
        return results

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes  # at most MAX_RESPONSE_BYTES


class Outbound:
    """One client session for every webhook call of this relay."""

    def __init__(
        self,
        policy: rules.UrlPolicy,
        *,
        timeout: float,
        concurrency: int,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.policy = policy
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, connect=min(timeout, 5.0), sock_connect=min(timeout, 5.0)
        )
        self._inner_resolver = resolver
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None

    @property
    def free_slots(self) -> int:
        return self._slots._value

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self.policy, self._inner_resolver),  # needs the loop
            use_dns_cache=False,
            limit=self._concurrency,
            force_close=True,  # no connection kept to a host whose name may rebind
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, trust_env=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Reply:
        """POST ``body``; raises Refused, aiohttp.ClientError or TimeoutError."""
        try:
            target = rules.check_webhook_url(url, self.policy)
        except rules.WebhookUrlRejected as exc:
            raise Refused(exc.message) from None
        if target.literal and not rules.address_allowed(target, target.host):
            raise Refused("webhook address is not allowed")
        assert self._session is not None, "outbound client not open"
        async with (
            self._slots,
            self._session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
            ) as response,
        ):
            data = await response.content.read(MAX_RESPONSE_BYTES)
            return Reply(response.status, data)
