"""Prometheus metrics. Each app owns a registry, so tests can run many apps in one process.

Per-request figures (``Front``, relay/http/front.py, counts and times every request) are plain
integers and ``Distribution`` histograms, exported at scrape time by a collector: the
library's own counter and histogram cost 3.6 us a request (a lock per increment, a bucket
loop), these about 1.2. Store metrics are read at scrape time from ``Store.stats()`` alike, so
the stores stay free of this library and pay nothing per request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from relay.auth.errors import REASONS, Reason
from relay.store.base import Distribution, Store

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""What ``/metrics`` answers with: the text format version this library renders."""

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"})
"""Methods kept as label values; any other (client-chosen) counts as ``other``."""

LIVE_KINDS = frozenset({"long-poll", "sse"})
"""Request kinds timed by the live-read histogram: held open by design, not slow."""

REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LIVE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def _histogram(name: str, doc: str, dist: Distribution) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], dist.cumulative(), dist.total)
    return family


class _StoreCollector(Collector):
    """Reads the store's counters at scrape time. Backend-only figures (pool, LISTEN,
    compaction) appear only where the backend has them."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        stats = self._store.stats()
        yield CounterMetricFamily("relay_store_commits", "Transactions committed", stats.commits)
        yield CounterMetricFamily("relay_store_appends", "Appends committed", stats.appends)
        yield CounterMetricFamily(
            "relay_store_rows_written", "Data rows written", stats.rows_written
        )
        yield GaugeMetricFamily(
            "relay_store_queue_depth", "Writes waiting for a group commit", stats.queue_depth
        )
        errors = CounterMetricFamily(
            "relay_store_errors",
            "Storage failures: unavailable (operations answered 503, database unreachable), "
            "storage_full (operations answered 503, no space to write), "
            "failed (transactions that failed otherwise and were re-run one by one)",
            labels=["kind"],
        )
        errors.add_metric(["unavailable"], stats.unavailable)
        errors.add_metric(["storage_full"], stats.storage_full)
        errors.add_metric(["failed"], stats.failed)
        yield errors
        yield _histogram(
            "relay_store_batch_operations", "Operations per group commit", stats.batch_ops
        )
        yield _histogram(
            "relay_store_commit_duration_seconds",
            "Time to apply and commit one group-commit batch",
            stats.commit_seconds,
        )
        optional = (
            ("relay_store_compacted_rows", "Rows merged away by compaction", stats.rows_compacted),
            ("relay_store_compacted_bytes", "Bytes compaction rewrote", stats.bytes_compacted),
            ("relay_store_compaction_passes", "Compaction passes run", stats.compaction_passes),
            ("relay_store_listen_reconnects", "LISTEN reconnections", stats.listen_reconnects),
            (
                "relay_store_statements",
                "Statements the committer sent (BEGIN and COMMIT included)",
                stats.statements,
            ),
            (
                "relay_store_guarded_writes",
                "Batches committed in one round trip, without taking locks",
                stats.guarded_writes,
            ),
            (
                "relay_store_diverged_streams",
                "Streams the database held less of than this relay acknowledged (writes refused)",
                stats.diverged_streams,
            ),
            (
                "relay_store_guard_misses",
                "One-round-trip writes refused because a stream changed (re-run with locks)",
                stats.guard_misses,
            ),
            ("relay_store_replica_reads", "Reads a read replica answered", stats.replica_reads),
            (
                "relay_store_replica_fallbacks",
                "Reads a read replica had not replayed far enough for (the primary answered)",
                stats.replica_fallbacks,
            ),
            (
                "relay_store_replica_errors",
                "Reads a read replica failed, down or refusing (the primary answered)",
                stats.replica_errors,
            ),
        )
        for name, doc, value in optional:
            if value is not None:
                yield CounterMetricFamily(name, doc, value)
        if stats.pool_in_use is not None:
            yield GaugeMetricFamily(
                "relay_store_pool_connections_in_use",
                "Database pool connections lent out",
                stats.pool_in_use,
            )
        if stats.replicas_up is not None:
            yield GaugeMetricFamily(
                "relay_store_replicas_up", "Read replicas in use", stats.replicas_up
            )
        if stats.pool_size is not None:
            yield GaugeMetricFamily(
                "relay_store_pool_connections", "Database pool connections open", stats.pool_size
            )


RequestKey = tuple[str, str, str]
"""(method label, route, status) of ``relay_http_requests_total``."""


class _RequestCollector(Collector):
    """Requests counted and timed in plain Python, exported under the names, labels and
    buckets the library's Counter and Histograms had (``_created`` for the counter only)."""

    def __init__(self) -> None:
        self.counts: dict[RequestKey, int] = {}
        self.created: dict[RequestKey, float] = {}
        self.durations: dict[str, Distribution] = {}  # by kind
        self.live: dict[str, Distribution] = {}  # by mode

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "relay_http_requests",
            "HTTP requests by method, route (stream, metrics, health, ready, other) and status",
            labels=["method", "route", "status"],
        )
        for key, count in list(self.counts.items()):
            requests.add_metric(list(key), count, created=self.created[key])
        yield requests
        yield _histograms(
            "relay_http_request_duration_seconds",
            "Time to answer a request, body sent, by kind (write, read: catch-up reads, "
            "other); live reads are in relay_http_live_read_duration_seconds",
            "kind",
            self.durations,
        )
        yield _histograms(
            "relay_http_live_read_duration_seconds",
            "How long a live read (long-poll or SSE) was held, by mode",
            "mode",
            self.live,
        )


def _histograms(
    name: str, doc: str, label: str, dists: dict[str, Distribution]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, dist in list(dists.items()):
        family.add_metric([value], dist.cumulative(), dist.total)
    return family


class SubscriptionMetrics:
    """Subscription delivery (sections 6-7): wakes, attempts by outcome, latency, retries,
    lease expiries, and subscriptions whose last webhook attempt failed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.wakes = Counter(
            "relay_subscription_wakes", "Wakes issued by this relay", registry=registry
        )
        self.deliveries = Counter(
            "relay_subscription_deliveries",
            "Delivery attempts (webhook POSTs, pull-wake events) by type and outcome",
            ["type", "outcome"],
            registry=registry,
        )
        for kind in ("webhook", "pull-wake"):  # exported at zero, so dashboards have series
            for outcome in ("ok", "done", "error"):
                self.deliveries.labels(kind, outcome)
        self.delivery_seconds = Histogram(
            "relay_subscription_delivery_seconds",
            "Time one delivery attempt took",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.retries = Counter(
            "relay_subscription_retries", "Delivery attempts after a failed one", registry=registry
        )
        self.lease_expiries = Counter(
            "relay_subscription_lease_expiries",
            "Leases that ran out before their wake finished",
            registry=registry,
        )
        self.failed = Gauge(
            "relay_subscriptions_failed",
            "Subscriptions whose last webhook delivery failed (retry scheduled)",
            registry=registry,
        )


class Metrics:
    """The app's registry and the instruments handlers touch."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        # process_cpu_seconds_total and friends: CPU per request is what operators watch.
        ProcessCollector(registry=registry)
        self.subscriptions = SubscriptionMetrics(registry)
        self._requests = _RequestCollector()
        registry.register(self._requests)
        self.appended_bytes = Counter("relay_appended_bytes", "Bytes appended", registry=registry)
        live = Gauge(
            "relay_live_readers", "Parked live readers, by mode", ["mode"], registry=registry
        )
        auth_failures = Counter(
            "relay_auth_failures",
            "Requests refused by access control (and live readers cut off), by reason",
            ["reason"],
            registry=registry,
        )
        self._auth_failures = {reason: auth_failures.labels(reason) for reason in REASONS}
        self.long_poll_readers = live.labels("long-poll")
        self.sse_readers = live.labels("sse")
        self.streams_created = Counter(
            "relay_streams_created", "Streams created (forks included)", registry=registry
        )
        self.streams_deleted = Counter(
            "relay_streams_deleted", "Streams deleted by request", registry=registry
        )
        self.streams_expired = Counter(
            "relay_streams_expired", "Streams removed on expiry (TTL or Expires-At)",
            registry=registry,
        )  # fmt: skip
        self._bound: dict[tuple[str, str, int, str], tuple[RequestKey, Distribution]] = {}

    def observe_request(
        self, method: str, route: str, status: int, kind: str, seconds: float
    ) -> None:
        """Count and time one request; ``kind`` is write, read, other, long-poll or sse."""
        key = (method, route, status, kind)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = self._bind(method, route, status, kind)
        counts = self._requests.counts
        counts[bound[0]] += 1
        bound[1].observe(seconds)

    def _bind(
        self, method: str, route: str, status: int, kind: str
    ) -> tuple[RequestKey, Distribution]:
        """Where one label set's requests are counted and timed, made on its first request.
        Methods are client-chosen: any unknown one counts as ``other``, so the tables stay
        small (and the binding table is bounded as well)."""
        if len(self._bound) > 1000:
            self._bound.clear()
        requests = self._requests
        counted = (method if method in METHODS else "other", route, str(status))
        if counted not in requests.counts:
            requests.counts[counted] = 0
            requests.created[counted] = time.time()
        if kind in LIVE_KINDS:
            timer = requests.live.setdefault(kind, Distribution(LIVE_BUCKETS))
        else:
            timer = requests.durations.setdefault(kind, Distribution(REQUEST_BUCKETS))
        return counted, timer

    def auth_failed(self, reason: Reason) -> None:
        self._auth_failures[reason].inc()

    def watch_store(self, store: Store) -> None:
        self.registry.register(_StoreCollector(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)


TIMESTAMPS = frozenset({"process_start_time_seconds"})
"""Gauges holding a moment, not a count: summed over workers they would mean nothing."""


class _Families(Collector):
    """Hands already built families to ``generate_latest``, which then renders them."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def sum_expositions(texts: Sequence[str]) -> bytes:
    """One exposition adding up several processes' own (``relay serve --workers``).

    Counters, gauges and histogram buckets, sums and counts are summed per sample name and
    label set (every gauge Relay exports is a count, so the sum is the relay's total);
    timestamps (``_created``, ``process_start_time_seconds``) keep the earliest. Families and
    samples keep the order they first appear in.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            seen = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen.setdefault(key, []).append(sample.value)
    for name, family in families.items():
        for (sample_name, labels), found in values[name].items():
            earliest = sample_name.endswith("_created") or sample_name in TIMESTAMPS
            value = min(found) if earliest else sum(found)
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
