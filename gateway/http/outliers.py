"""Passive health checks: an upstream that keeps failing is left out of its route's rotation.

As Envoy's outlier detection: `routes[].outlier.consecutive_failures` failures in a row (the
connection refused, reset or timed out before a response began) eject the upstream for
`outlier.ejection`, multiplied by the number of times it was ejected since it last answered, up to
`outlier.max_ejection`. A response of any status is an answer: an application's 503 is the
application's business. At most `outlier.max_ejected_percent` of a route's upstreams are out at
once, so a route with one upstream never ejects it and its clients still get the upstream's own
errors. Before this, a round robin over a dead and a live upstream failed every other request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.routing import Route, Upstream


def pick(route: Route, now: float) -> Upstream:
    """Round robin over the upstreams not ejected (all of them if every one is)."""
    ups = route.upstreams
    n = len(ups)
    if n == 1:
        return ups[0]
    for _ in range(n):
        i = route.next_upstream
        route.next_upstream = (i + 1) % n
        up = ups[i]
        if up.ejected_until <= now:
            return up
    return ups[route.next_upstream]


def failed(route: Route, up: Upstream, now: float) -> None:
    """A failure before any response: count it, and eject the upstream past the threshold."""
    if up.ejected_until > now:
        return  # out already: a request sent before it left
    up.failures += 1
    cfg = route.config.outlier
    if up.failures < cfg.consecutive_failures:
        return
    ups = route.upstreams
    out = sum(1 for u in ups if u.ejected_until > now)
    if (out + 1) * 100 > cfg.max_ejected_percent * len(ups):
        return  # the route keeps enough upstreams in rotation; this one's errors reach its clients
    up.ejections += 1
    up.failures = 0
    up.ejected_until = now + min(cfg.ejection * up.ejections, cfg.max_ejection)
    route.ejections += 1


def answered(up: Upstream) -> None:
    """A response began: the upstream is healthy again, and its next ejection starts short."""
    up.failures = 0
    up.ejections = 0


def carry_over(old: list[Route], new: list[Route]) -> None:
    """A reload's routes take over the health of the ones they replace (same route name, same upstream
    origin): an ejected upstream stays out, its backoff and the counters go on."""
    before = {r.name: r for r in old}
    for route in new:
        prev = before.get(route.name)
        if prev is None:
            continue
        route.ejections = prev.ejections
        route.next_upstream = prev.next_upstream % len(route.upstreams)
        health = {(u.scheme, u.host, u.port): u for u in prev.upstreams}
        for up in route.upstreams:
            was = health.get((up.scheme, up.host, up.port))
            if was is not None:
                up.failures, up.ejected_until, up.ejections = was.failures, was.ejected_until, was.ejections


class EjectionMetrics(Collector):
    """`gateway_upstream_ejections_total{route}` and `gateway_upstream_ejected{route}`, read at a scrape."""

    def __init__(self, routes: Callable[[], list[Route]], time: Callable[[], float]) -> None:
        self.routes = routes  # the routes now: a reload (gateway/reload.py) replaces them
        self.time = time  # the event loop's clock, which ejections are timed by

    def collect(self) -> Iterator[Metric]:
        now = self.time()
        total = CounterMetricFamily(
            "gateway_upstream_ejections", "Upstreams left out of rotation after failing in a row", labels=["route"]
        )
        out = GaugeMetricFamily("gateway_upstream_ejected", "Upstreams out of rotation now", labels=["route"])
        for r in self.routes():
            if len(r.upstreams) > 1:
                total.add_metric([r.name], r.ejections)
                out.add_metric([r.name], sum(1 for u in r.upstreams if u.ejected_until > now))
        yield total
        yield out
