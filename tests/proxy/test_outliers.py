"""Passive health checks (`routes[].outlier`): an upstream that fails in a row leaves the rotation
for a while, longer each time it fails again on return; never more than the route's share at once."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.config.routes import RouteConfig
from gateway.http import outliers
from gateway.routing import Route, compile_route
from tests.helpers.net import free_port
from tests.helpers.upstream import RecordingUpstream, ok

from .wire import ScriptedUpstream, get, route


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused at once


async def statuses(h: Any, n: int) -> list[int]:
    c = await h.send(b"")
    out = []
    for _ in range(n):
        await c.send(get("/"))
        out.append((await c.response()).status)
    return out


async def test_a_dead_upstream_leaves_the_rotation(gateway) -> None:
    live = await RecordingUpstream(respond=lambda r: ok(b"live")).start()
    try:
        h = await gateway(
            [route(live.url, upstream=[dead_url(), live.url], outlier={"consecutive_failures": 2})]
        )
        # round robin: dead, live, dead (its second failure in a row: out), then live only
        assert await statuses(h, 10) == [502, 200, 502] + [200] * 7
        assert len(live.requests) == 8
    finally:
        await live.close()


async def test_a_route_with_one_upstream_never_ejects_it(gateway) -> None:
    h = await gateway([route(dead_url(), outlier={"consecutive_failures": 1})])
    assert await statuses(h, 4) == [502] * 4  # the upstream's own failure, every time: no fast-fail


async def test_at_most_the_ejected_share_is_out_at_once(gateway) -> None:
    live = await RecordingUpstream(respond=lambda r: ok(b"live")).start()
    try:
        ups = [dead_url(), dead_url(), live.url, live.url]  # two dead of four: 50 % may be out
        h = await gateway([route(live.url, upstream=ups, outlier={"consecutive_failures": 1})])
        assert await statuses(h, 8) == [502, 502, 200, 200] + [200] * 4
        h3 = await gateway(
            [route(live.url, upstream=ups, outlier={"consecutive_failures": 1, "max_ejected_percent": 25})]
        )
        # one dead upstream may leave; the other keeps failing its turn
        assert await statuses(h3, 8) == [502, 502, 200, 200, 502, 200, 200, 502]
    finally:
        await live.close()


def compiled(n: int, **outlier: Any) -> Route:
    cfg = RouteConfig(
        name="r", path="/", upstream=[f"http://127.0.0.1:{9000 + i}" for i in range(n)], auth="none",
        outlier=outlier,
    )
    return compile_route(cfg, {})


def test_ejection_grows_while_the_upstream_keeps_failing_and_resets_when_it_answers() -> None:
    r = compiled(2, consecutive_failures=2, ejection="30s", max_ejection="75s")
    a, b = r.upstreams
    outliers.failed(r, a, 100.0)
    assert a.ejected_until == 0.0  # one failure is not yet a pattern
    outliers.failed(r, a, 100.0)
    assert a.ejected_until == 130.0 and r.ejections == 1
    assert [outliers.pick(r, 110.0) for _ in range(3)] == [b, b, b]
    outliers.failed(r, a, 120.0)  # a failure while out (a request already on its way) changes nothing
    assert a.ejected_until == 130.0
    assert {id(outliers.pick(r, 130.0)) for _ in range(2)} == {id(a), id(b)}  # back in the rotation
    outliers.failed(r, a, 131.0)
    assert a.ejected_until == 130.0  # one failure after its return...
    outliers.failed(r, a, 131.0)
    assert a.ejected_until == 191.0  # ...and a second: out again, twice as long
    outliers.failed(r, a, 200.0)
    outliers.failed(r, a, 200.0)
    assert a.ejected_until == 275.0  # three times would be 90 s: capped at 75
    outliers.answered(a)  # it answered: the next ejection is short again
    outliers.failed(r, a, 300.0)
    outliers.failed(r, a, 300.0)
    assert a.ejected_until == 330.0 and r.ejections == 4


def test_a_failure_streak_is_broken_by_an_answer() -> None:
    r = compiled(2, consecutive_failures=3)
    a, _ = r.upstreams
    for _ in range(2):
        outliers.failed(r, a, 10.0)
    outliers.answered(a)
    for _ in range(2):
        outliers.failed(r, a, 10.0)
    assert a.ejected_until == 0.0


def test_ejection_metrics() -> None:
    many, one = compiled(3, consecutive_failures=1), compiled(1)
    registry = CollectorRegistry()
    now = [50.0]
    registry.register(outliers.EjectionMetrics(lambda: [many, one], lambda: now[0]))
    outliers.failed(many, many.upstreams[0], 50.0)
    assert registry.get_sample_value("gateway_upstream_ejections_total", {"route": "r"}) == 1
    assert registry.get_sample_value("gateway_upstream_ejected", {"route": "r"}) == 1
    now[0] = 81.0
    assert registry.get_sample_value("gateway_upstream_ejected", {"route": "r"}) == 0
    assert registry.get_sample_value("gateway_upstream_ejections_total", {"route": "r"}) == 1


async def test_a_slow_upload_timing_out_does_not_count_against_the_upstream(gateway) -> None:
    a = await RecordingUpstream(respond=lambda r: ok(b"a")).start()
    b = await RecordingUpstream(respond=lambda r: ok(b"b")).start()
    try:
        h = await gateway(
            [route(a.url, upstream=[a.url, b.url], timeouts={"read": "200ms"}, outlier={"consecutive_failures": 1})]
        )
        for _ in range(2):  # one on each upstream: the body never ends, the read timeout passes
            c = await h.send(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\n\r\nhalf")
            assert (await c.response(timeout=5.0)).status == 504
        c = await h.send(b"")
        bodies = []
        for _ in range(4):
            await c.send(get("/"))
            bodies.append((await c.response()).body)
        assert sorted(bodies) == [b"a", b"a", b"b", b"b"]  # neither left the rotation
    finally:
        await a.close()
        await b.close()


async def test_an_upstream_that_stops_reading_an_upload_counts_as_failing(gateway) -> None:
    """The body never completes, but because the upstream stopped reading it, not the client."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await asyncio.sleep(30)  # accepts, never reads, never answers

    stuck = await ScriptedUpstream(deaf).start()
    live = await RecordingUpstream(respond=lambda r: ok(b"live")).start()
    try:
        h = await gateway(
            [route(live.url, upstream=[stuck.url, live.url], max_body="64MiB", timeouts={"read": "300ms"},
                   outlier={"consecutive_failures": 1})]
        )
        c = await h.client()
        size = 32 * 1024 * 1024  # far past what the sockets between can hold
        c.writer.write(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: %d\r\n\r\n" % size)
        c.writer.write(b"x" * size)  # not drained: the gateway stops reading once the upstream does
        assert (await c.response(timeout=10.0)).status == 504
        c.writer.transport.abort()
        assert await statuses(h, 6) == [200] * 6  # the deaf upstream left the rotation
        assert stuck.connections == 1
    finally:
        await stuck.close()
        await live.close()


def test_a_reload_keeps_the_health_of_the_upstreams_it_keeps() -> None:
    old = compiled(3, consecutive_failures=1, ejection="30s")
    outliers.failed(old, old.upstreams[1], 10.0)
    outliers.failed(old, old.upstreams[2], 10.0)  # 2 of 3 would pass 50 %: not ejected, one failure kept
    outliers.pick(old, 10.0)
    cfg = old.config.model_copy(update={"upstream": [old.config.upstream[1], old.config.upstream[2], "http://127.0.0.1:9999"]})
    new = compile_route(cfg, {})
    outliers.carry_over([old], [new])
    kept_b, kept_c, fresh = new.upstreams
    assert kept_b.ejected_until == 40.0 and kept_b.ejections == 1  # still out after the reload
    assert kept_c.failures == 1 and kept_c.ejected_until == 0.0
    assert fresh.failures == 0 and fresh.ejected_until == 0.0
    assert new.ejections == 1
