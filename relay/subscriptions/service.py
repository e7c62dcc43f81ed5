"""The relay's subscription engine: the append hook, the delivery worker and the sweeps.

- **Append hook** (:meth:`Subscriptions.on_append`, called after every local commit): an
  in-memory index of linked paths and patterns answers "does any subscription care?"; for
  the common "no" it costs a dict lookup (and a cached glob check). A "yes" queues the
  stream for the worker, which links newly matched streams and issues wakes.
- **Worker** (one task per relay): takes due deliveries from the database (each taken by
  one relay at a time, see :mod:`relay.subscriptions.state`) and runs each as its own task
  under a global concurrency limit, so a slow receiver delays nobody else.
- **Sweeps** (every ``sweep_interval``): expire leases, wake idle subscriptions with pending
  work (appends made through other relays, or missed by a relay that died), link streams a
  pattern matches that the hook did not see, and reload the index and keys, which is how
  changes made through other relays arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

import orjson
import structlog

from protocol import subscriptions as rules
from protocol.errors import Unavailable
from protocol.glob import Matcher, compile_glob
from relay.metrics import SubscriptionMetrics
from relay.subscriptions import keys as keyring
from relay.subscriptions.db import Database
from relay.subscriptions.outbound import Outbound
from relay.subscriptions.state import Delivery, SubscriptionState

log = structlog.get_logger("relay.subscriptions")

AppendJson = Callable[[str, bytes], Awaitable[None]]
MISS_CACHE_LIMIT = 10_000
DISCOVERY_HORIZON_SECONDS = 60.0
# A taken delivery is this relay's for the webhook timeout plus this margin (to record the
# outcome); after that another relay (or this one, restarted) takes it over as a new wake.
CLAIM_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class EngineSettings:
    control_path: str  # where this relay serves the control API (callbacks go there)
    poll_interval: float = 0.25  # how often due deliveries are looked for
    sweep_interval: float = 1.0
    webhook_timeout: float = 10.0
    public_url: str = ""


class Subscriptions:
    """Subscriptions of one relay (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        outbound: Outbound,
        metrics: SubscriptionMetrics,
        append_json: AppendJson,
        settings: EngineSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.state = SubscriptionState(db)
        self.outbound = outbound
        self.metrics = metrics
        self.settings = settings
        self.clock = clock
        self.keys: keyring.Keys | None = None
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.randbytes(4).hex()}"
        self._append_json = append_json
        self._rng = random.Random()
        self._subs: set[str] = set()  # live subscriptions, as this relay last saw them
        self._patterns: dict[str, Matcher] = {}
        self._linked: dict[str, set[str]] = {}
        self._misses: set[str] = set()  # paths no pattern matches (cleared on pattern changes)
        self._dirty: dict[str, int] = {}  # relative path -> start of its earliest unseen append
        self._kick = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._next_sweep = 0.0
        self.report_failed = True  # export the database-wide failed count from this relay

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        await self.db.open()
        self.keys = await keyring.load(self.db, self.clock())
        await self.outbound.open()
        await self._reload_index()
        self._worker = asyncio.create_task(self._run(), name="subscriptions")

    async def close(self) -> None:
        tasks = [t for t in (self._worker, *self._deliveries) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await self.state.release_deliveries(self.owner)
        except Exception:  # the database is gone: the claims run out by themselves
            log.warning("could not hand back unfinished deliveries", exc_info=True)
        await self.outbound.close()
        await self.db.close()

    # -- the append hook --------------------------------------------------------------------

    def on_append(self, path: str, start: int) -> None:
        """After a local commit to ``path`` whose new bytes begin at ``start``."""
        if not self._linked and not self._patterns:
            return
        if path not in self._linked and not self._pattern_hit(path):
            return
        if path not in self._dirty or start < self._dirty[path]:
            self._dirty[path] = start
        self._kick.set()

    def _pattern_hit(self, relative: str) -> bool:
        if relative in self._misses or not self._patterns:
            return False
        if any(match(relative) for match in self._patterns.values()):
            return True
        if len(self._misses) >= MISS_CACHE_LIMIT:
            self._misses.clear()
        self._misses.add(relative)
        return False

    def indexed(self, sub_id: str, pattern: str | None, paths: list[str]) -> None:
        """Record a subscription this relay just created or changed."""
        self._subs.add(sub_id)
        if pattern is not None:
            self._patterns[sub_id] = compile_glob(pattern)
            self._misses.clear()
        for path in paths:
            self._linked.setdefault(path, set()).add(sub_id)

    def unindexed(self, sub_id: str) -> None:
        self._subs.discard(sub_id)
        self._patterns.pop(sub_id, None)
        for subs in self._linked.values():
            subs.discard(sub_id)

    async def _reload_index(self) -> None:
        patterns, links = await self.state.index()
        linked: dict[str, set[str]] = {}
        for sub_id, path in links:
            linked.setdefault(path, set()).add(sub_id)
        self._subs = set(patterns)
        self._patterns = {s: compile_glob(p) for s, p in patterns.items() if p is not None}
        self._linked = linked
        self._misses.clear()

    def kick(self) -> None:
        """A wake was issued here: look for due deliveries now."""
        self.metrics.wakes.inc()
        self._kick.set()

    # -- the worker -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.settings.poll_interval)
            self._kick.clear()
            try:
                await self._drain_appends()
                now = self.clock()
                if now >= self._next_sweep:
                    self._next_sweep = now + self.settings.sweep_interval
                    if self._subs:
                        await self._sweep(now)
                    else:  # nothing to deliver; only learn of other relays' subscriptions
                        await self._reload_index()
                    self.keys = await keyring.load(self.db, now)  # rotations made elsewhere
                if self._subs:
                    await self._take(self.clock())
            except asyncio.CancelledError:
                raise
            except Unavailable as exc:  # the database is away (the store logs the outage)
                log.info("subscription worker waiting for the database", reason=str(exc))
                await asyncio.sleep(self.settings.poll_interval)
            except Exception:
                log.exception("subscription worker pass failed")
                await asyncio.sleep(self.settings.poll_interval)

    async def _drain_appends(self) -> None:
        dirty, self._dirty = self._dirty, {}
        for relative, start in dirty.items():
            subs = set(self._linked.get(relative, ()))
            new = [s for s, match in self._patterns.items() if s not in subs and match(relative)]
            if new:
                await self.state.link_discovered(new, relative, start)
                self.indexed_paths(new, relative)
            for sub_id in (*subs, *new):
                if await self.state.try_wake(sub_id, self.clock()):
                    self.metrics.wakes.inc()

    def indexed_paths(self, sub_ids: list[str], relative: str) -> None:
        self._linked.setdefault(relative, set()).update(sub_ids)

    async def _sweep(self, now: float) -> None:
        expired, woken = await self.state.expire_leases(now)
        self.metrics.lease_expiries.inc(expired)
        self.metrics.wakes.inc(len(woken))
        await self.state.follow_replaced_streams()
        await self.state.discover(now - DISCOVERY_HORIZON_SECONDS)
        for sub_id in await self.state.pending_idle():
            if await self.state.try_wake(sub_id, self.clock()):
                self.metrics.wakes.inc()
        await self._reload_index()
        if self.report_failed:
            self.metrics.failed.set(await self.state.failed_count())

    async def _take(self, now: float) -> None:
        room = self.outbound.free_slots - len(self._deliveries)
        if room <= 0:
            return
        hold = self.settings.webhook_timeout + CLAIM_MARGIN_SECONDS
        for delivery in await self.state.take_deliveries(self.owner, now, room, hold):
            task = asyncio.create_task(self._deliver(delivery))
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    # -- delivery ---------------------------------------------------------------------------

    async def _deliver(self, delivery: Delivery) -> None:
        if delivery.reissued:
            self.metrics.wakes.inc()
        sub = delivery.view.sub
        if delivery.attempt > 1:
            self.metrics.retries.inc()
        started = time.perf_counter()
        try:
            if sub.config.kind == rules.WEBHOOK:
                ok, done, detail = await self._post_webhook(delivery)
            else:
                ok, done, detail = await self._write_wake_event(delivery)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("subscription delivery crashed", subscription_id=sub.id)
            ok, done, detail = False, False, "internal error"
        elapsed = time.perf_counter() - started
        outcome = ("done" if done else "ok") if ok else "error"
        self.metrics.deliveries.labels(sub.config.kind, outcome).inc()
        self.metrics.delivery_seconds.observe(elapsed)
        host = _host(sub.config.webhook_url or "") if sub.config.webhook_url else None
        log.info(
            "subscription delivery",
            subscription_id=sub.id,
            type=sub.config.kind,
            host=host,
            wake_stream=sub.config.wake_stream,
            generation=sub.generation,
            attempt=delivery.attempt,
            outcome=outcome,
            status=detail,
            ms=round(elapsed * 1000, 1),
        )
        now = self.clock()
        if ok:
            result = await self.state.delivered(delivery, self.owner, now, done=done)
            if result is not None and result.woke:
                self.kick()
        else:
            delay = rules.retry_delay(delivery.attempt, self._rng)
            await self.state.failed(delivery, self.owner, now, delay)

    async def _post_webhook(self, delivery: Delivery) -> tuple[bool, bool, str]:
        view, keys = delivery.view, self.keys
        sub = view.sub
        assert keys is not None and sub.wake_id is not None and sub.config.webhook_url
        now = self.clock()
        claims = rules.TokenClaims(
            sub.id, sub.generation, sub.wake_id, now + rules.TOKEN_TTL_SECONDS
        )
        token = rules.make_token(keys.token_secret, claims)
        base = self.settings.public_url or sub.base_url
        path = f"{self.settings.control_path}subscriptions/{quote(sub.id, safe='')}/callback"
        callback = base + path
        body = rules.webhook_body(sub.id, sub.wake_id, sub.generation, view.links, callback, token)
        headers = {
            "Content-Type": "application/json",
            "Webhook-Signature": keys.sign(body, int(now)),
        }
        try:
            reply = await self.outbound.post(sub.config.webhook_url, body, headers)
        except Exception as exc:  # refused, unreachable, timed out: all retried
            return False, False, type(exc).__name__
        if not 200 <= reply.status < 300:
            return False, False, str(reply.status)
        try:
            parsed = orjson.loads(reply.body) if reply.body else None
        except orjson.JSONDecodeError:
            parsed = None
        done = isinstance(parsed, dict) and parsed.get("done") is True
        return True, done, str(reply.status)

    async def _write_wake_event(self, delivery: Delivery) -> tuple[bool, bool, str]:
        sub = delivery.view.sub
        assert sub.config.wake_stream is not None
        event = rules.wake_event(
            sub.id, sub.trigger_path or "", sub.generation, int(self.clock() * 1000)
        )
        try:
            await self._append_json(sub.config.wake_stream, orjson.dumps(event))
        except Exception as exc:
            return False, False, type(exc).__name__
        return True, False, "appended"


def _host(url: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname
    except ValueError:
        return None
