"""Prometheus metrics. Names are part of the contract; labels come from config, never from raw input."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

# `_created` series double the output and mean nothing to a gateway's operators.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """One registry per process; label children are cached so the hot path only increments."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # gateway_requests_total and the duration histograms live in gateway/telemetry.py.
        self.auth_rejections = Counter(
            "gateway_auth_rejections_total", "Requests refused by authentication", ["reason"], registry=r
        )
        self.ratelimited = Counter("gateway_ratelimited_total", "Requests refused by a rate limit", ["route"], registry=r)
        self.query_key = Counter(
            "gateway_query_key_total", "API keys sent in the query string", ["route", "action"], registry=r
        )
        self.rotated_key_requests = Counter(
            "gateway_rotated_key_requests_total", "Requests made with a key in its rotation grace", registry=r
        )
        self.cache_counts = {"hit": 0, "miss": 0, "negative": 0, "stale": 0}
        r.register(_PlainCounters(self))
        self.ratelimit_degraded = Gauge(
            "gateway_ratelimit_degraded", "1 while the rate-limit backend is failing and the policy applies", registry=r
        )
        self.store_up = Gauge("gateway_key_store_up", "1 when the key store answered its last call", registry=r)
        self.store_up.set(1)
        self._auth_children: dict[str, Counter] = {}

    def auth_rejected(self, reason: str) -> None:
        child = self._auth_children.get(reason)
        if child is None:
            child = self._auth_children[reason] = self.auth_rejections.labels(reason)
        child.inc()

    def cache(self, result: str) -> None:
        self.cache_counts[result] += 1


class _PlainCounters(Collector):
    """Counters kept as plain ints on the hot path and read only when Prometheus scrapes.

    prometheus_client's Counter takes a lock per increment; at per-request rates that is a
    measurable share of the budget (bench/auth_micro.py).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily("gateway_key_cache", "Key lookups by cache outcome", labels=["result"])
        for result, n in self.metrics.cache_counts.items():
            fam.add_metric([result], n)
        yield fam
