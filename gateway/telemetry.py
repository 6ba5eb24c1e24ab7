"""After each response: request metrics, one usage record, an optional JSON access-log line.

The per-request counters and histograms are plain ints read only when Prometheus scrapes:
prometheus_client takes a lock per increment, and PERFORMANCE.md counts 4-6 µs per request for
metrics plus a usage record done its way. Labels come from config (route names, a fixed method
list, status codes), never from raw input; per-key series exist only for the top-K keys.
"""

from __future__ import annotations

import json
import sys
from bisect import bisect_left
from collections.abc import Iterator
from time import perf_counter
from typing import IO

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.anomalies import Detector
from gateway.clock import Clock
from gateway.http.exchange import Exchange
from gateway.usage.record import UsageRecord
from gateway.usage.writer import UsageWriter

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = frozenset(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
MAX_KEYS_TRACKED = 10_000
# A NamedTuple's own constructor is a Python function with a frame; its fields are built in order here.
_new_record = tuple.__new__


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus has them: each counts everything up to its bound."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, doc, buckets=self.cumulative(), sum_value=self.sum)


class RequestMetrics(Collector):
    def __init__(self, per_key_top: int) -> None:
        self.per_key_top = per_key_top
        self.requests: dict[tuple[str, str, int], int] = {}  # the status stays an int until a scrape
        self.per_key: dict[str, int] = {}
        self.per_key_other = 0
        self.duration = Histogram()
        self.upstream = Histogram()

    def count(self, route: str, method: str, status: int, key_id: str | None) -> None:
        label = (route, method if method in METHODS else "OTHER", status)
        self.requests[label] = self.requests.get(label, 0) + 1
        if key_id is not None and self.per_key_top:
            per_key = self.per_key
            n = per_key.get(key_id)
            if n is not None:
                per_key[key_id] = n + 1
            elif len(per_key) < MAX_KEYS_TRACKED:
                per_key[key_id] = 1
            else:
                self.per_key_other += 1

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily("gateway_requests", "Requests answered", labels=["route", "method", "code"])
        for (route, method, code), n in list(self.requests.items()):
            fam.add_metric([route, method, str(code)], n)
        yield fam
        yield self.duration.family("gateway_request_duration_seconds", "Whole request, first byte in to last byte out")
        yield self.upstream.family("gateway_upstream_duration_seconds", "Upstream exchange, request sent to response end")
        keys = CounterMetricFamily("gateway_key_requests", "Requests per key: the top keys, the rest as other", labels=["key"])
        ranked = sorted(self.per_key.items(), key=lambda kv: kv[1], reverse=True)
        for key_id, n in ranked[: self.per_key_top]:
            keys.add_metric([key_id], n)
        other = self.per_key_other + sum(n for _, n in ranked[self.per_key_top :])
        keys.add_metric(["other"], other)
        yield keys


class AccessLog:
    """JSON lines with the usage record's fields; buffered, flushed by the proxy's ticker."""

    def __init__(self, path: str) -> None:
        self.stream: IO[str] = sys.stdout if path in ("-", "stdout") else open(path, "a", buffering=1 << 16)  # noqa: SIM115
        self.owned = self.stream is not sys.stdout

    def write(self, record: UsageRecord) -> None:
        self.stream.write(json.dumps(record._asdict(), separators=(",", ":")) + "\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.flush()
        if self.owned:
            self.stream.close()


class Telemetry:
    """The observer the proxy calls once per finished exchange."""

    def __init__(
        self,
        clock: Clock,
        metrics: RequestMetrics,
        usage: UsageWriter | None,
        access_log: AccessLog | None,
        anomalies: Detector | None = None,
    ) -> None:
        self.anomalies = anomalies
        self.clock = clock
        self.metrics = metrics
        self.put = usage.put if usage is not None else None
        self.access_log = access_log

    def __call__(self, ex: Exchange) -> None:
        end = perf_counter()
        p = ex.principal
        record = p.record if p is not None else None
        route = ex.route.name if ex.route is not None else None
        latency = end - ex.began
        up_start = ex.upstream_started
        upstream = (ex.upstream_ended or end) - up_start if up_start else None
        self.metrics.count(route or "-", ex.method, ex.status, record.id if record else None)
        self.metrics.duration.observe(latency)
        if upstream is not None:
            self.metrics.upstream.observe(upstream)
        if self.anomalies is not None:
            self.anomalies.observe(ex)
        if self.put is None and self.access_log is None:
            return
        usage = _new_record(
            UsageRecord,
            (
                ex.request_id,
                self.clock.time(),
                record.id if record else None,
                record.owner if record else None,
                record.env if record else None,
                route,
                ex.method,
                ex.status,
                ex.upstream_status or None,
                round(latency * 1000, 3),
                round(upstream * 1000, 3) if upstream is not None else None,
                ex.body_received,
                ex.bytes_out,
                ex.client_ip,
                ex.error_code or None,
            ),
        )
        if self.put is not None:
            self.put(usage)
        if self.access_log is not None:
            self.access_log.write(usage)
