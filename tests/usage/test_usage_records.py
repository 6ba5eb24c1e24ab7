"""One usage record per request that reached the gateway, allowed or refused, written in batches.

Every test runs on SQLite and on PostgreSQL, with an in-process gateway whose usage writer runs in
the test's loop. Records are read back with plain SQL, not through the gateway's own code.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.keys.format import generate
from gateway.store.base import UsageStore
from gateway.usage.record import FIELDS, UsageRecord
from gateway.usage.writer import UsageWriter
from tests.helpers.gateway import metric
from tests.helpers.upstream import RecordingUpstream
from tests.usage.conftest import Start
from tests.usage.support import (
    Conn,
    GatewayProcess,
    Resp,
    bearer,
    call,
    config_data,
    default_routes,
    usage_rows,
    wait_for,
    wait_rows,
)


def routes(up: RecordingUpstream) -> list[dict[str, Any]]:
    return [*default_routes(up.url), {"name": "limited", "path": "/limited", "upstream": up.url, "ratelimit": ["2/minute"]}]


def uuid7_ms(request_id: str) -> int:
    u = uuid.UUID(request_id)
    assert u.version == 7, request_id
    assert u.variant == uuid.RFC_4122, request_id
    assert str(u) == request_id  # canonical lowercase text form
    return u.int >> 80


def record_writes(store: Any) -> list[tuple[float, list[UsageRecord]]]:
    """Wrap the store's write_usage on the instance: (monotonic time, batch) of each call."""
    calls: list[tuple[float, list[UsageRecord]]] = []
    original = store.write_usage

    async def write_usage(records: list[UsageRecord]) -> None:
        calls.append((time.monotonic(), list(records)))
        await original(records)

    store.write_usage = write_usage
    return calls


async def test_one_record_per_request_allowed_or_refused(start: Start, up: RecordingUpstream, store_url: str) -> None:
    gw = await start(routes(up))
    alice, alice_key = await gw.services.keys.create("alice", scopes=["orders:read", "orders:write"])
    bob, bob_key = await gw.services.keys.create("bob", env="test", scopes=["reports:read"])
    # name -> (response, expected fields of its record)
    sent: dict[str, tuple[Resp, dict[str, Any]]] = {}
    t0 = time.time()

    async def send(name: str, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                   body: bytes = b"", **expect: Any) -> Resp:
        resp = await call(gw.port, method, target, headers, body)
        sent[name] = (resp, {"method": method, **expect})
        return resp

    alice_rec = {"key_id": alice.id, "owner": "alice", "env": "live"}
    none_rec = {"key_id": None, "owner": None, "env": None}
    await send("get", "GET", "/orders/1", bearer(alice_key), **alice_rec, route="orders", status=200,
               upstream_status=200, error_code=None, bytes_in=0)
    await send("post", "POST", "/orders", [("X-API-Key", alice_key)], b'{"item": 42}', **alice_rec,
               route="orders", status=200, upstream_status=200, error_code=None, bytes_in=12)
    await send("bob", "GET", "/reports/daily", bearer(bob_key), key_id=bob.id, owner="bob", env="test",
               route="reports", status=200, upstream_status=200, error_code=None, bytes_in=0)
    await send("missing", "GET", "/orders/1", **none_rec, route="orders", status=401, upstream_status=None,
               error_code="missing_api_key", bytes_in=0)
    await send("invalid", "GET", "/orders/1", bearer(generate("sk", "live")), **none_rec, route="orders",
               status=401, upstream_status=None, error_code="invalid_api_key", bytes_in=0)
    await send("scope", "GET", "/reports/daily", bearer(alice_key), **alice_rec, route="reports", status=403,
               upstream_status=None, error_code="insufficient_scope", bytes_in=0)
    await send("no_route", "GET", "/nowhere", **none_rec, route=None, status=404, upstream_status=None,
               error_code="no_route", bytes_in=0)
    await send("too_large", "POST", "/small", bearer(alice_key), b"x" * 100, **none_rec, route="small",
               status=413, upstream_status=None, error_code="payload_too_large")
    await send("limit1", "GET", "/limited", bearer(alice_key), **alice_rec, route="limited", status=200,
               upstream_status=200, error_code=None, bytes_in=0)
    await send("limit2", "GET", "/limited", bearer(alice_key), **alice_rec, route="limited", status=200,
               upstream_status=200, error_code=None, bytes_in=0)
    await send("limited", "GET", "/limited", bearer(alice_key), **alice_rec, route="limited", status=429,
               upstream_status=None, error_code="rate_limited", bytes_in=0)
    await send("down", "GET", "/down/x", **none_rec, route="down", status=502, upstream_status=None,
               error_code="upstream_unavailable", bytes_in=0)
    await send("open", "DELETE", "/open/thing?x=1", **none_rec, route="open", status=200, upstream_status=200,
               error_code=None, bytes_in=0)
    t1 = time.time()

    for name, (resp, expect) in sent.items():
        assert resp.status == expect["status"], (name, resp.status, resp.body)
        if expect["error_code"] is not None:
            assert resp.code == expect["error_code"], (name, resp.body)

    rows = {r["request_id"]: r for r in await wait_rows(store_url, len(sent))}
    # the upstream saw the same X-Request-ID as the client, for every request that reached it
    upstream_ids = [req.header("x-request-id") for req in up.requests]
    forwarded = [resp.request_id for resp, e in sent.values() if e["upstream_status"] is not None]
    assert upstream_ids == forwarded

    for name, (resp, expect) in sent.items():
        rid = resp.request_id
        row = rows.pop(rid, None)
        assert row is not None, f"no usage record for {name} ({rid})"
        assert set(row) == set(FIELDS)
        for field, value in expect.items():
            assert row[field] == value, (name, field, row[field], value)
        assert t0 - 0.01 <= row["at"] <= t1 + 0.01, (name, row["at"], t0, t1)
        assert abs(uuid7_ms(rid) / 1000 - row["at"]) < 2.0, name  # minted when the request arrived
        assert row["client_ip"] == "127.0.0.1", (name, row["client_ip"])
        assert row["bytes_out"] == len(resp.body), (name, row["bytes_out"], len(resp.body))
        assert 0 < row["latency_ms"] < 5000, (name, row["latency_ms"])
        if expect["upstream_status"] is not None:
            assert row["upstream_ms"] is not None and 0 <= row["upstream_ms"] <= row["latency_ms"], (name, row)
        else:
            assert row["upstream_ms"] is None, (name, row)
    assert not rows, f"records for requests never sent: {rows}"
    assert len({resp.request_id for resp, _ in sent.values()}) == len(sent)


async def test_refusals_on_one_keep_alive_connection_each_get_a_record(start: Start, up: RecordingUpstream,
                                                                        store_url: str) -> None:
    gw = await start(routes(up))
    _, key = await gw.services.keys.create("carol", scopes=["orders:read"])
    conn = await Conn.open(gw.port)
    try:
        answers = [
            await conn.request("GET", "/orders/a", bearer(key)),
            await conn.request("GET", "/orders/b"),
            await conn.request("GET", "/nowhere"),
            await conn.request("GET", "/orders/c", bearer(key)),
            # refused before its body was read: answered, then the connection closes
            await conn.request("POST", "/orders", bearer(key), b"{}"),
        ]
    finally:
        await conn.close()
    assert [r.status for r in answers] == [200, 401, 404, 200, 403]
    rows = await wait_rows(store_url, len(answers))
    assert {r["request_id"]: r["status"] for r in rows} == {r.request_id: r.status for r in answers}


async def test_records_are_written_in_batches_of_at_most_batch_size(start: Start, store_url: str) -> None:
    # A flush interval far longer than the test: a full batch is what wakes the writer.
    gw = await start(usage={"batch_size": 5, "flush_interval": "60s"})
    writes = record_writes(gw.services.store)
    conn = await Conn.open(gw.port)
    try:
        ids = [(await conn.request("GET", f"/open/{i}")).request_id for i in range(4)]
        await asyncio.sleep(0.3)
        assert writes == []  # 4 < batch_size: nothing wakes the writer yet
        assert gw.services.metrics.registry.get_sample_value("gateway_usage_queue_depth") == 4
        ids += [(await conn.request("GET", f"/open/{i}")).request_id for i in range(4, 23)]
        await wait_for(lambda: len({r.request_id for _, b in writes for r in b}) >= 20, 5, what="20 records")
    finally:
        await conn.close()
    def queued() -> float:
        return float(gw.services.metrics.registry.get_sample_value("gateway_usage_queue_depth") or 0)

    # a batch taken off the queue reaches the store's write a moment later: wait for that
    await wait_for(lambda: queued() + sum(len(b) for _, b in writes) == len(ids), 5, what="the queue to settle")
    assert all(1 <= len(b) <= 5 for _, b in writes), [len(b) for _, b in writes]
    written_ids = [r.request_id for _, b in writes for r in b]
    assert written_ids == ids[: len(written_ids)]  # in the order served
    await gw.close()  # shutdown flushes what is still queued
    rows = await usage_rows(store_url)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)


async def test_records_wait_at_most_the_flush_interval(start: Start, store_url: str) -> None:
    interval = 0.3
    gw = await start(usage={"batch_size": 1000, "flush_interval": "300ms"})
    writes = record_writes(gw.services.store)
    for round_ in range(3):
        t_sent = time.monotonic()
        ids = {(await call(gw.port, "GET", f"/open/{round_}/{i}")).request_id for i in range(3)}
        await wait_for(lambda ids=ids: ids <= {r.request_id for _, b in writes for r in b}, 5,
                       what="the batch")
        t_written = max(t for t, b in writes if ids & {r.request_id for r in b})
        assert t_written - t_sent <= interval + 0.5, (round_, t_written - t_sent)  # < the 1s default
    assert all(len(b) <= 3 for _, b in writes)
    await wait_rows(store_url, 9)


async def test_writes_are_idempotent_on_request_id(start: Start, store_url: str, spool_dir: Any) -> None:
    gw = await start()
    writer = gw.services.usage
    store = gw.services.store
    assert isinstance(writer, UsageWriter) and isinstance(store, UsageStore)
    writes = record_writes(store)
    ids = [(await call(gw.port, "GET", f"/open/{i}")).request_id for i in range(4)]
    await wait_rows(store_url, 4)
    batch = [r for _, b in writes for r in b]
    assert [r.request_id for r in batch] == ids
    before = metric(gw, "gateway_usage_written_total")

    # the same records through the writer's queue again (a replay after a crash, say)
    for r in batch:
        writer.put(r)
    await wait_for(lambda: metric(gw, "gateway_usage_written_total") >= before + 4, 5, what="the second write")
    assert len(await usage_rows(store_url)) == 4

    # the same batch straight to the store, twice, and mixed with a new record
    await store.write_usage(batch)
    await store.write_usage(batch)
    fresh = batch[0]._replace(request_id=str(uuid.UUID(int=uuid.UUID(batch[0].request_id).int + 1)))
    await store.write_usage([*batch, fresh])
    rows = await usage_rows(store_url)
    assert sorted(r["request_id"] for r in rows) == sorted([*ids, fresh.request_id])

    # a spooled batch the store already has (acknowledged, then a crash before the file went)
    path = writer.spool.append(batch)
    await wait_for(lambda: not path.exists(), 5, what="the replay of the spooled batch")
    assert len(await usage_rows(store_url)) == 5
    assert await store.count_usage() == 5


async def test_a_stuck_store_never_delays_a_response(start: Start, store_url: str) -> None:
    gw = await start(usage={"write_timeout": "60s", "flush_interval": "50ms", "batch_size": 10})
    store = gw.services.store
    original = store.write_usage
    entered = asyncio.Event()
    release = asyncio.Event()

    async def stuck(records: list[UsageRecord]) -> None:
        entered.set()
        await release.wait()
        await original(records)

    store.write_usage = stuck  # type: ignore[method-assign]
    assert not asyncio.iscoroutinefunction(UsageWriter.put)  # a plain call after the response
    conn = await Conn.open(gw.port)
    ids = []
    try:
        ids.append((await conn.request("GET", "/open/first")).request_id)
        await asyncio.wait_for(entered.wait(), 5)  # the writer is now blocked inside the store
        slowest = 0.0
        for i in range(200):
            t = time.monotonic()
            resp = await conn.request("GET", f"/open/{i}")
            slowest = max(slowest, time.monotonic() - t)
            assert resp.status == 200
            ids.append(resp.request_id)
        assert slowest < 0.5, slowest
        depth = gw.services.metrics.registry.get_sample_value("gateway_usage_queue_depth")
        assert depth == len(ids) - 1, depth  # all but the first, which the stuck write holds
    finally:
        release.set()
        await conn.close()
    rows = await wait_rows(store_url, len(ids))
    assert {r["request_id"] for r in rows} == set(ids)


async def test_refusals_before_routing_record_the_client_ip(start: Start, store_url: str) -> None:
    """The client IP is part of every record, also when the request is refused before its route's
    stages run (no route, a body over the cap, a bad path)."""
    gw = await start()
    answers = [
        await call(gw.port, "GET", "/nowhere"),
        await call(gw.port, "POST", "/small", body=b"x" * 100),
        await call(gw.port, "GET", "/open/%2e%2e/x"),
        await call(gw.port, "GET", "/open/ok"),
    ]
    assert [r.status for r in answers] == [404, 413, 400, 200]
    rows = await wait_rows(store_url, len(answers))
    assert {r["request_id"]: r["client_ip"] for r in rows} == {r.request_id: "127.0.0.1" for r in answers}


@pytest.mark.parametrize("method", ["HEAD", "PUT", "PATCH", "OPTIONS"])
async def test_the_method_is_recorded_as_sent(start: Start, store_url: str, method: str) -> None:
    gw = await start()
    resp = await call(gw.port, method, "/open/m", body=b"abc" if method in ("PUT", "PATCH") else b"")
    assert resp.status == 200
    (row,) = await wait_rows(store_url, 1)
    assert (row["request_id"], row["method"], row["route"]) == (resp.request_id, method, "open")
    assert row["bytes_in"] == (3 if method in ("PUT", "PATCH") else 0)


async def test_latencies_under_gateway_run_are_finer_than_a_millisecond(tmp_path: Path, up: RecordingUpstream) -> None:
    """`gateway run` uses uvloop, whose loop.time() moves in whole milliseconds (and only once per
    loop iteration): latencies taken from it come out as 0.0, 1.0, 2.0 ms, and a sub-millisecond
    upstream exchange is recorded as taking no time at all. Records and histograms need a finer clock."""
    store = f"sqlite:///{tmp_path / 'gateway.db'}"
    gw = GatewayProcess(tmp_path, config_data(store, up.url, usage={"spool_dir": str(tmp_path / "spool")}),
                        log_level="WARNING")
    try:
        await asyncio.to_thread(gw.wait_ready)
        conn = await Conn.open(gw.port)
        try:
            ids = [(await conn.request("GET", f"/open/{i}")).request_id for i in range(100)]
        finally:
            await conn.close()
        rows = await wait_rows(store, len(ids))
    finally:
        assert await asyncio.to_thread(gw.stop_checked) == 0, gw.stderr()[-2000:]
    latencies = [r["latency_ms"] for r in rows]
    upstream = [r["upstream_ms"] for r in rows]
    assert all(u is not None and 0 < u <= total for u, total in zip(upstream, latencies, strict=True)), rows[:3]
    whole = sum(1 for v in latencies + upstream if float(v).is_integer())
    assert whole < len(rows), f"{whole} of {2 * len(rows)} latencies are whole milliseconds: {latencies[:10]}"
