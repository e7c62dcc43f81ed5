"""Prometheus metrics. Each app owns a registry, so tests can run many apps in one process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from relay.auth.errors import REASONS, Reason
from relay.store.base import Store


class _StoreCollector(Collector):
    """Reads the store's plain counters at scrape time."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self):  # type: ignore[no-untyped-def]
        stats = self._store.stats()
        yield CounterMetricFamily("relay_store_commits", "Transactions committed", stats.commits)
        yield CounterMetricFamily("relay_store_appends", "Appends committed", stats.appends)
        yield CounterMetricFamily(
            "relay_store_rows_written", "Data rows written", stats.rows_written
        )
        yield CounterMetricFamily(
            "relay_store_rows_compacted", "Data rows merged by compaction", stats.rows_compacted
        )
        sizes = stats.batch_sizes
        mean = sum(sizes) / len(sizes) if sizes else 0.0
        yield GaugeMetricFamily(
            "relay_store_batch_size_mean", "Mean operations per commit, recent batches", mean
        )


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
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.subscriptions = SubscriptionMetrics(self.registry)
        self.requests = Counter(
            "relay_http_requests",
            "HTTP requests by method and status",
            ["method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "relay_http_request_seconds",
            "Time to first byte of the response, by method",
            ["method"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.appended_bytes = Counter(
            "relay_appended_bytes", "Bytes appended", registry=self.registry
        )
        self.live_readers = Gauge(
            "relay_live_readers", "Parked long-poll and SSE readers", registry=self.registry
        )
        auth_failures = Counter(
            "relay_auth_failures",
            "Requests refused by access control (and live readers cut off), by reason",
            ["reason"],
            registry=self.registry,
        )
        self._auth_failures = {reason: auth_failures.labels(reason) for reason in REASONS}

        # Children bound once per (method, status): a label lookup per request is measurable.
        self._bound: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, method: str, status: int, seconds: float) -> None:
        bound = self._bound.get((method, status))
        if bound is None:
            if len(self._bound) > 1000:  # methods are client-chosen: bound the table
                self._bound.clear()
            bound = self._bound[(method, status)] = (
                self.requests.labels(method, str(status)),
                self.latency.labels(method),
            )
        bound[0].inc()
        bound[1].observe(seconds)

    def auth_failed(self, reason: Reason) -> None:
        self._auth_failures[reason].inc()

    def watch_store(self, store: Store) -> None:
        self.registry.register(_StoreCollector(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)


AVERAGED = frozenset({"relay_store_batch_size_mean"})
"""Gauges that are means: summed over workers they would mean nothing, so they are averaged."""


class _Families(Collector):
    """Hands already built families to ``generate_latest``, which then renders them."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def sum_expositions(texts: Sequence[str]) -> bytes:
    """One exposition adding up several processes' own (``relay serve --workers``).

    Counters, gauges and histogram buckets, sums and counts are summed per sample name and
    label set; ``_created`` timestamps keep the earliest and the gauges in ``AVERAGED`` are
    averaged. Families and samples keep the order they first appear in.
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
            if sample_name.endswith("_created"):
                value = min(found)
            elif sample_name in AVERAGED:
                value = sum(found) / len(found)
            else:
                value = sum(found)
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry()
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
