"""Usage reports over records made by real requests: `gateway usage` (a subprocess) and GET /admin/usage.

The gateway runs on a fake clock that starts two days ago, so some records are old enough for
`--since` to leave them out; it is then moved to the present. The expected numbers are kept here,
from what the clients sent and received, not read back from the store.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import FakeClock
from tests.helpers.configs import write_config
from tests.helpers.gateway import RunningGateway
from tests.helpers.upstream import RecordingUpstream
from tests.usage.conftest import Start
from tests.usage.support import (
    ADMIN_TOKEN,
    admin,
    bearer,
    call,
    cli,
    config_data,
    usage_rows,
    wait_rows,
)

DAY = 86400.0


@dataclass
class Sent:
    at: float
    key: str
    owner: str
    route: str
    status: int
    code: str | None
    bytes_in: int
    bytes_out: int
    request_id: str

    def group(self, by: str) -> str:
        if by == "day":
            return datetime.fromtimestamp(self.at, UTC).strftime("%Y-%m-%d")
        return str(getattr(self, by))


@dataclass
class Traffic:
    gw: RunningGateway
    clock: FakeClock
    sent: list[Sent]
    keys: dict[str, str]  # name -> key id
    config: Path
    latencies: dict[str, float]  # request id -> latency_ms as stored


def expected(sent: list[Sent], by: str, since: float, key: str | None = None,
             owner: str | None = None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in sent:
        if s.at < since or (key is not None and s.key != key) or (owner is not None and s.owner != owner):
            continue
        g = out.setdefault(s.group(by), {"requests": 0, "errors": 0, "refusals": Counter(), "bytes_in": 0,
                                         "bytes_out": 0})
        g["requests"] += 1
        g["errors"] += s.status >= 500
        if s.code is not None:
            g["refusals"][s.code] += 1
        g["bytes_in"] += s.bytes_in
        g["bytes_out"] += s.bytes_out
    for g in out.values():
        g["refusals"] = dict(g["refusals"])
    return out


def percentile_cont(values: list[float], p: float) -> float:
    v = sorted(values)
    x = p * (len(v) - 1)
    lo, hi = math.floor(x), math.ceil(x)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def check_rows(rows: list[dict[str, Any]], traffic: Traffic, by: str, since: float, key: str | None = None,
               owner: str | None = None) -> None:
    """The report's rows against the expected groups: exact counts, and the percentiles of the stored
    latencies (PostgreSQL's percentile_cont, which the SQLite store reproduces)."""
    want = expected(traffic.sent, by, since, key, owner)
    got = {r["group"]: r for r in rows}
    assert len(got) == len(rows), rows  # one row per group
    assert set(got) == set(want), (by, sorted(got), sorted(want))
    for group, w in want.items():
        r = got[group]
        assert {k: r[k] for k in w} == w, (by, group, r, w)
        lat = [traffic.latencies[s.request_id] for s in traffic.sent
               if s.group(by) == group and s.at >= since and (key is None or s.key == key)
               and (owner is None or s.owner == owner)]
        for name, p in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            assert r[name] == pytest.approx(percentile_cont(lat, p), rel=1e-6, abs=1e-6), (group, name)
    if by != "day":  # busiest first
        assert [r["requests"] for r in rows] == sorted((r["requests"] for r in rows), reverse=True)


@pytest.fixture
async def traffic(start: Start, up: RecordingUpstream, store_url: str, tmp_path: Path, spool_dir: Path) -> Traffic:
    now = time.time()
    clock = FakeClock(now - 2 * DAY)
    gw = await start(clock=clock)
    keys = gw.services.keys
    a1, a1_key = await keys.create("alice", name="a1", scopes=["orders:read", "orders:write"])
    a2, a2_key = await keys.create("alice", name="a2", scopes=["reports:read"])
    b, b_key = await keys.create("bob", scopes=["orders:read"], limits=["2/minute"])
    names = {a1.id: "a1", a2.id: "a2", b.id: "b"}
    sent: list[Sent] = []

    async def send(key_id: str | None, owner: str | None, method: str, target: str,
                   headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        resp = await call(gw.port, method, target, headers, body)
        route = target.split("/")[1] if target.split("/")[1] in ("orders", "reports", "down") else "-"
        sent.append(Sent(clock.time(), key_id or "-", owner or "-", route, resp.status, resp.code,
                         len(body), len(resp.body), resp.request_id))

    # two days ago
    for i in range(2):
        await send(a1.id, "alice", "GET", f"/orders/old{i}", bearer(a1_key))
    await send(b.id, "bob", "GET", "/orders/old", bearer(b_key))
    clock.advance(2 * DAY)
    # now
    for i in range(4):
        await send(a1.id, "alice", "GET", f"/orders/{i}", bearer(a1_key))
    await send(a1.id, "alice", "POST", "/orders", bearer(a1_key), b'{"qty": 10}')
    for i in range(2):
        await send(a1.id, "alice", "GET", f"/reports/{i}", bearer(a1_key))  # 403 insufficient_scope
    for i in range(3):
        await send(a2.id, "alice", "GET", f"/reports/{i}", bearer(a2_key))
    for i in range(3):
        await send(b.id, "bob", "GET", f"/orders/b{i}", bearer(b_key))  # the third: 429
    for i in range(2):
        await send(None, None, "GET", f"/orders/anon{i}")  # 401 missing_api_key
    await send(None, None, "GET", "/nowhere")  # 404 no_route
    for i in range(2):
        await send(None, None, "GET", f"/down/{i}")  # 502 upstream_unavailable

    statuses = Counter((names.get(s.key, s.key), s.status) for s in sent)
    assert statuses == Counter({("a1", 200): 7, ("a1", 403): 2, ("a2", 200): 3, ("b", 200): 3, ("b", 429): 1,
                                ("-", 401): 2, ("-", 404): 1, ("-", 502): 2}), statuses
    rows = await wait_rows(store_url, len(sent))
    latencies = {r["request_id"]: r["latency_ms"] for r in rows}
    config = write_config(tmp_path / "gateway.yaml",
                          config_data(store_url, up.url, usage={"spool_dir": str(spool_dir)}))
    return Traffic(gw, clock, sent, {"a1": a1.id, "a2": a2.id, "b": b.id}, config, latencies)


async def test_gateway_usage_command(traffic: Traffic) -> None:
    now = traffic.clock.time()
    day_ago, three_days_ago = now - DAY - 60, now - 3 * DAY
    # every grouping, both periods, each filter; the subprocesses run side by side
    cases: list[tuple[list[str], dict[str, Any]]] = [
        (["--since", "24h", "--by", "key"], {"by": "key", "since": day_ago}),
        (["--since", "3d", "--by", "owner"], {"by": "owner", "since": three_days_ago}),
        (["--since", "3d", "--by", "route", "--key", traffic.keys["a1"]],
         {"by": "route", "since": three_days_ago, "key": traffic.keys["a1"]}),
        (["--since", "3d", "--by", "day", "--owner", "bob"], {"by": "day", "since": three_days_ago, "owner": "bob"}),
    ]
    runs = await asyncio.gather(*(cli(traffic.config, "usage", *args, "--json") for args, _ in cases))
    for (args, want), run in zip(cases, runs, strict=True):
        assert run.code == 0, (args, run.err)
        check_rows(run.json(), traffic, **want)

    as_csv, table, bad_by, bad_since, both = await asyncio.gather(
        cli(traffic.config, "usage", "--since", "24h", "--by", "owner", "--csv"),
        cli(traffic.config, "usage", "--since", "24h", "--by", "route"),
        cli(traffic.config, "usage", "--by", "minute"),
        cli(traffic.config, "usage", "--since", "yesterday"),
        cli(traffic.config, "usage", "--json", "--csv"),
    )
    assert as_csv.code == 0, as_csv.err
    check_csv(as_csv.out, traffic, "owner", day_ago)

    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split()[:2] == ["ROUTE", "REQUESTS"]
    by_route = {line.split()[0]: line.split() for line in lines[1:]}
    for group, w in expected(traffic.sent, "route", day_ago).items():
        cols = by_route[group]
        assert [int(c) for c in cols[1:6]] == [w["requests"], w["errors"], sum(w["refusals"].values()),
                                               w["bytes_in"], w["bytes_out"]], (group, cols)
        assert sorted(cols[9:]) == sorted(f"{c}={n}" for c, n in w["refusals"].items()), (group, cols)

    assert bad_by.code == 2 and "minute" in bad_by.err
    assert bad_since.code == 1 and "since" in bad_since.err
    assert both.code == 1 and "--json or --csv" in both.err and both.out == ""


def check_csv(text: str, traffic: Traffic, by: str, since: float, **filters: str) -> None:
    reader = csv.DictReader(io.StringIO(text))
    assert reader.fieldnames == ["group", "requests", "errors", "refusals", "bytes_in", "bytes_out",
                                 "p50_ms", "p95_ms", "p99_ms"]
    rows = []
    for r in reader:
        refusals = dict(part.split("=") for part in r["refusals"].split(";")) if r["refusals"] else {}
        rows.append({"group": r["group"], "requests": int(r["requests"]), "errors": int(r["errors"]),
                     "refusals": {k: int(v) for k, v in refusals.items()}, "bytes_in": int(r["bytes_in"]),
                     "bytes_out": int(r["bytes_out"])})
    want = expected(traffic.sent, by, since, **filters)
    assert {r["group"]: {k: v for k, v in r.items() if k != "group"} for r in rows} == want


async def test_admin_usage_endpoint(traffic: Traffic) -> None:
    gw, now = traffic.gw, traffic.clock.time()
    day_ago, three_days_ago = now - DAY - 60, now - 3 * DAY

    async def get(target: str, headers: list[tuple[str, str]] | None = None) -> Any:
        return await call(gw.admin_port, "GET", target, admin() if headers is None else headers)

    for headers in ([], [("Authorization", "Bearer wrong-token")]):
        resp = await get("/admin/usage", headers)
        assert resp.status == 401, resp.body
        assert b"requests" not in resp.body

    resp = await get("/admin/usage")
    assert resp.status == 200 and resp.header("content-type", ).startswith("application/json")
    doc = resp.json()
    assert doc["by"] == "key"
    check_rows(doc["rows"], traffic, "key", day_ago)

    for by in ("key", "owner", "route", "day"):
        for since, start in (("24h", day_ago), ("3d", three_days_ago)):
            resp = await get(f"/admin/usage?by={by}&since={since}")
            assert resp.status == 200, resp.body
            assert resp.json()["by"] == by
            check_rows(resp.json()["rows"], traffic, by, start)

    resp = await get(f"/admin/usage?by=route&since=3d&key={traffic.keys['b']}")
    check_rows(resp.json()["rows"], traffic, "route", three_days_ago, key=traffic.keys["b"])
    resp = await get("/admin/usage?by=day&since=3d&owner=alice")
    check_rows(resp.json()["rows"], traffic, "day", three_days_ago, owner="alice")

    resp = await get("/admin/usage?by=route&since=24h&format=csv")
    assert resp.status == 200
    assert (resp.header("content-type") or "").startswith("text/csv")
    check_csv(resp.body.decode(), traffic, "route", day_ago)

    for bad in ("by=minute", "by=", "since=yesterday", "since=-1h"):
        resp = await get(f"/admin/usage?{bad}")
        assert resp.status == 400, (bad, resp.body)
        assert (resp.header("content-type") or "").split(";")[0] == "application/problem+json", resp.headers
        assert resp.json()["code"] == "invalid_input", resp.body
    # a credential sent to the proxy that is not a key (here the admin token) is refused, recorded as a
    # refusal, and never stored
    refused = await call(traffic.gw.port, "GET", "/orders/with-admin-token", bearer(ADMIN_TOKEN))
    assert refused.status == 401
    await wait_rows(traffic.gw.services.config.store, len(traffic.sent) + 1)
    rows = await usage_rows_text(traffic)
    assert refused.request_id in rows and ADMIN_TOKEN not in rows


async def usage_rows_text(traffic: Traffic) -> str:
    store_url = traffic.gw.services.config.store
    return json.dumps(await usage_rows(store_url), default=str)
