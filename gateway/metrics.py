"""Prometheus metrics. Names are part of the contract; labels come from config, never from raw input."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per process; label children are cached so the hot path only increments."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests_total", "Requests answered", ["route", "method", "code"], registry=r
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds", "Whole request, first byte in to last byte out", registry=r
        )
        self.upstream_duration = Histogram(
            "gateway_upstream_duration_seconds", "Upstream exchange time", registry=r
        )
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
        self.key_cache = Counter(
            "gateway_key_cache_total", "Key lookups by cache outcome", ["result"], registry=r
        )
        self.store_up = Gauge("gateway_key_store_up", "1 when the key store answered its last call", registry=r)
        self.store_up.set(1)
        self._auth_children: dict[str, Counter] = {}
        self._cache_children = {k: self.key_cache.labels(k) for k in ("hit", "miss", "negative", "stale")}

    def auth_rejected(self, reason: str) -> None:
        child = self._auth_children.get(reason)
        if child is None:
            child = self._auth_children[reason] = self.auth_rejections.labels(reason)
        child.inc()

    def cache(self, result: str) -> None:
        self._cache_children[result].inc()
