"""GET /metrics on the admin listener: the contract's names, values that follow the traffic, bounded
labels, top-K per-key series, no raw key, `promtool check metrics`, and correct totals with workers."""

from __future__ import annotations

import asyncio
import random
import string
import subprocess
from typing import Any

import aiohttp
import pytest

from gateway.keys.format import generate
from gateway.telemetry import METHODS
from tests.helpers.gateway import RunningGateway
from tests.helpers.upstream import RecordingUpstream
from tests.usage.conftest import Start
from tests.usage.support import (
    Conn,
    GatewayProcess,
    Samples,
    bearer,
    call,
    config_data,
    default_routes,
    label_values,
    parse_metrics,
    request_bytes,
    total,
    wait_for,
)

CONTRACT = {
    "gateway_requests_total": {"route", "method", "code"},
    "gateway_auth_rejections_total": {"reason"},
    "gateway_ratelimited_total": {"route"},
    "gateway_query_key_total": {"route", "action"},
}
HISTOGRAMS = ("gateway_request_duration_seconds", "gateway_upstream_duration_seconds")


def routes(up: RecordingUpstream) -> list[dict[str, Any]]:
    return [*default_routes(up.url),
            {"name": "limited", "path": "/limited", "upstream": up.url, "ratelimit": ["1/minute"]}]


async def scrape(gw: RunningGateway) -> tuple[str, Samples]:
    resp = await call(gw.admin_port, "GET", "/metrics")  # no Authorization header: none needed
    assert resp.status == 200, resp.body
    assert (resp.header("content-type") or "").startswith("text/plain; version=")
    text = resp.body.decode()
    return text, parse_metrics(text)


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=30, check=False)


def histogram_ok(samples: Samples, name: str) -> float:
    """Buckets cumulative and ending at +Inf == _count; return _count."""
    buckets = sorted(((float(dict(lab)["le"]), v) for (n, lab), v in samples.items() if n == f"{name}_bucket"))
    assert buckets and buckets[-1][0] == float("inf"), name
    values = [v for _, v in buckets]
    assert values == sorted(values), (name, values)
    count = total(samples, f"{name}_count")
    assert values[-1] == count
    assert (total(samples, f"{name}_sum") > 0) == (count > 0), name  # durations: positive once observed
    return count


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


async def test_contract_metrics_follow_the_traffic(start: Start, up: RecordingUpstream) -> None:
    gw = await start(routes(up))
    _, key = await gw.services.keys.create("alice", scopes=["orders:read", "orders:write"])
    unknown = generate("sk", "live")
    _, before = await scrape(gw)
    for name in HISTOGRAMS:
        histogram_ok(before, name)

    sent = [
        await call(gw.port, "GET", "/orders/1", bearer(key)),
        await call(gw.port, "GET", "/orders/2", [("X-API-Key", key)]),
        await call(gw.port, "GET", "/orders/3", bearer(key)),
        await call(gw.port, "POST", "/orders", bearer(key), b"{}"),
        await call(gw.port, "GET", "/orders/4"),
        await call(gw.port, "GET", "/orders/5"),
        await call(gw.port, "GET", "/orders/6", bearer(unknown)),
        await call(gw.port, "GET", "/orders/7", bearer(unknown)),
        await call(gw.port, "GET", f"/orders/8?api_key={key}"),
        await call(gw.port, "GET", f"/warn/9?api_key={key}"),
        await call(gw.port, "GET", "/limited/a", bearer(key)),
        await call(gw.port, "GET", "/limited/b", bearer(key)),
        await call(gw.port, "GET", "/nowhere"),
        await call(gw.port, "GET", "/down/x"),
    ]
    assert [r.status for r in sent] == [200, 200, 200, 200, 401, 401, 401, 401, 400, 200, 200, 429, 404, 502]
    text, after = await scrape(gw)

    for name, labels in CONTRACT.items():
        assert f"# TYPE {name} counter" in text, name
        series = [dict(lab) for (n, lab), _ in after.items() if n == name]
        assert series and all(set(s) == labels for s in series), (name, series)
    for name in HISTOGRAMS:
        assert f"# TYPE {name} histogram" in text
    for gauge in ("gateway_usage_queue_depth", "gateway_usage_spool_bytes"):
        assert f"# TYPE {gauge} gauge" in text
    assert "# TYPE gateway_usage_dropped_total counter" in text
    assert "# TYPE gateway_key_cache_total counter" in text

    def d(name: str, **labels: str) -> float:
        return delta(after, before, name, **labels)

    assert d("gateway_requests_total", route="orders", method="GET", code="200") == 3
    assert d("gateway_requests_total", route="orders", method="POST", code="200") == 1
    assert d("gateway_requests_total", route="orders", method="GET", code="401") == 4
    assert d("gateway_requests_total", route="orders", method="GET", code="400") == 1
    assert d("gateway_requests_total", route="warn", method="GET", code="200") == 1
    assert d("gateway_requests_total", route="limited", method="GET", code="200") == 1
    assert d("gateway_requests_total", route="limited", method="GET", code="429") == 1
    assert d("gateway_requests_total", route="-", method="GET", code="404") == 1
    assert d("gateway_requests_total", route="down", method="GET", code="502") == 1
    assert d("gateway_requests_total") == len(sent)
    assert histogram_ok(after, "gateway_request_duration_seconds") - histogram_ok(
        before, "gateway_request_duration_seconds") == len(sent)
    forwarded = sum(1 for r in sent if r.status == 200)
    assert histogram_ok(after, "gateway_upstream_duration_seconds") - histogram_ok(
        before, "gateway_upstream_duration_seconds") == forwarded

    assert d("gateway_auth_rejections_total", reason="missing") == 2
    assert d("gateway_auth_rejections_total", reason="invalid") == 2
    assert d("gateway_auth_rejections_total") == 5  # and the key in the query under `reject`
    assert d("gateway_ratelimited_total", route="limited") == 1
    assert d("gateway_ratelimited_total") == 1
    assert d("gateway_query_key_total", route="orders", action="rejected") == 1
    assert d("gateway_query_key_total", route="warn", action="warned") == 1
    assert d("gateway_query_key_total") == 2

    # key cache: 7 lookups of the real key (the first a miss), one unknown key missed, then remembered
    assert d("gateway_key_cache_total", result="miss") == 2
    assert d("gateway_key_cache_total", result="hit") == 6
    assert d("gateway_key_cache_total", result="negative") == 1
    assert total(after, "gateway_usage_dropped_total") == 0
    assert total(after, "gateway_usage_spool_bytes") == 0
    assert key not in text and unknown not in text


async def test_labels_never_come_from_raw_paths(start: Start, up: RecordingUpstream) -> None:
    gw = await start(routes(up))
    rng = random.Random(20240501)
    tokens = ["".join(rng.choices(string.ascii_lowercase + string.digits, k=16)) for _ in range(1000)]
    _, before = await scrape(gw)
    conn = await Conn.open(gw.port)
    try:
        for i in range(0, len(tokens), 25):  # pipelined, 25 at a time (limits.max_pipelined is 32)
            answers = await conn.many([request_bytes("GET", f"/{t}/{t[:4]}?q={t}") for t in tokens[i:i + 25]])
            assert {r.status for r in answers} == {404}
        # under a route's prefix the label is the route's name, whatever follows
        for i in range(0, 50, 25):
            answers = await conn.many([request_bytes("GET", f"/open/{t}") for t in tokens[i:i + 25]])
            assert {r.status for r in answers} == {200}
        # methods outside the fixed list share one label
        for method in ("PROPFIND", "MKCOL", "PURGE", "REPORT", "LOCK"):
            assert (await conn.request(method, f"/open/{tokens[0]}")).status == 200
    finally:
        await conn.close()
    text, after = await scrape(gw)
    configured = {r["name"] for r in routes(up)}
    assert label_values(after, "gateway_requests_total", "route") <= configured | {"-"}
    assert label_values(after, "gateway_requests_total", "method") <= set(METHODS) | {"OTHER"}
    new = {lab for (n, lab) in after if n == "gateway_requests_total"} - {
        lab for (n, lab) in before if n == "gateway_requests_total"}
    assert {dict(lab)["route"] for lab in new} <= {"-", "open"}, new
    assert len(new) <= 3, new  # (-, GET, 404), (open, GET, 200), (open, OTHER, 200)
    assert total(after, "gateway_requests_total", route="-", method="GET", code="404") == 1000
    assert total(after, "gateway_requests_total", route="open", method="OTHER", code="200") == 5
    for t in tokens:
        assert t not in text
    for method in ("PROPFIND", "MKCOL", "PURGE", "REPORT", "LOCK"):
        assert method not in text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(lines) < 400, len(lines)  # bounded whatever the traffic


async def test_per_key_series_only_for_the_top_keys(start: Start, up: RecordingUpstream) -> None:
    gw = await start(routes(up), metrics={"per_key_top": 3})
    keys = [await gw.services.keys.create(f"owner{i}", scopes=["orders:read"]) for i in range(6)]
    conn = await Conn.open(gw.port)
    try:
        for i, (_, raw) in enumerate(keys):
            for _ in range(6 - i):  # 6, 5, 4, 3, 2, 1 requests
                assert (await conn.request("GET", "/orders/x", bearer(raw))).status == 200
    finally:
        await conn.close()
    text, samples = await scrape(gw)
    per_key = {dict(lab)["key"]: v for (n, lab), v in samples.items() if n == "gateway_key_requests_total"}
    assert per_key == {keys[0][0].id: 6, keys[1][0].id: 5, keys[2][0].id: 4, "other": 3 + 2 + 1}
    for record, raw in keys:
        assert raw not in text
        assert record.hint not in text or record.id in per_key  # nothing about the other keys at all
    for record, _ in keys[3:]:
        assert record.id not in text


async def test_promtool_accepts_the_output(start: Start, up: RecordingUpstream) -> None:
    gw = await start(routes(up))
    _, key = await gw.services.keys.create("alice", scopes=["orders:read"])
    for target, headers in (("/orders/1", bearer(key)), ("/orders/1", None), (f"/warn/1?api_key={key}", None),
                            (f"/orders/1?api_key={key}", None), ("/limited/1", bearer(key)),
                            ("/limited/1", bearer(key)), ("/nowhere", None), ("/down/1", None)):
        await call(gw.port, "GET", target, headers)
    text, _ = await scrape(gw)
    result = await asyncio.to_thread(promtool, text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


async def test_workers_metrics_are_summed_by_the_supervisor(tmp_path: Any, up: RecordingUpstream) -> None:
    data = config_data(f"sqlite:///{tmp_path / 'gateway.db'}", up.url,
                       usage={"spool_dir": str(tmp_path / "spool")})
    gw = GatewayProcess(tmp_path, data, workers=2, log_level="WARNING")
    try:
        await asyncio.to_thread(gw.wait_ready)
        m = 300
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each: both workers serve
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(i: int) -> int:
                async with session.get(f"{gw.url}/open/{i}") as resp:
                    await resp.read()
                    return resp.status

            statuses = []
            for i in range(0, m, 50):
                statuses += await asyncio.gather(*(one(j) for j in range(i, i + 50)))
        assert statuses == [200] * m

        async def summed() -> float:
            return total(parse_metrics(await asyncio.to_thread(gw.metrics)), "gateway_requests_total")

        async def exactly_m() -> bool:
            n = await summed()
            assert n <= m, n
            return n == m

        await wait_for(exactly_m, 5, 0.1, f"gateway_requests_total == {m}")
        samples = parse_metrics(await asyncio.to_thread(gw.metrics))
        assert total(samples, "gateway_requests_total", route="open", method="GET", code="200") == m
        assert total(samples, "gateway_request_duration_seconds_count") == m
        assert total(samples, "gateway_usage_dropped_total") == 0
        # the next snapshots add nothing twice
        await asyncio.sleep(1.2)
        assert await summed() == m
    finally:
        code = await asyncio.to_thread(gw.stop)
    assert code == 0, gw.stderr()[-2000:]


@pytest.mark.parametrize("path", ["/metrics", "/metrics?name[]=gateway_requests_total"])
async def test_metrics_need_no_token_but_the_admin_api_does(start: Start, up: RecordingUpstream,
                                                              path: str) -> None:
    gw = await start(routes(up))
    assert (await call(gw.admin_port, "GET", path)).status == 200
    assert (await call(gw.admin_port, "GET", "/admin/usage")).status == 401
