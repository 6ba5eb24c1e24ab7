"""Nothing lost: with the store down, batches go to the disk spool and come back oldest first.

The store is taken down two ways: a wrapper that makes write_usage raise StoreUnavailable (exact
control over which write fails), and a real PostgreSQL stopped with pg_ctl. At the spool's cap,
`shed` answers 503 on metered routes and `drop` serves and counts what it loses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.store import StoreUnavailable
from gateway.usage.record import FIELDS, UsageRecord
from gateway.usage.spool import Spool
from gateway.usage.writer import UsageWriter
from tests.helpers.gateway import RunningGateway, metric
from tests.usage.conftest import Start
from tests.usage.support import (
    Conn,
    Postgres,
    bearer,
    call,
    parse_metrics,
    total,
    usage_rows,
    wait_for,
    wait_rows,
)


class Outage:
    """Wraps a store's write_usage on the instance: fails while `down`, and logs every call with the
    spool files that existed when it was made."""

    def __init__(self, gw: RunningGateway, spool: Path) -> None:
        self.store = gw.services.store
        self.spool = spool
        self.down = False
        self.fail_calls: set[int] = set()  # indexes in `calls` of calls to fail even when up
        self.calls: list[tuple[list[str], list[str], bool]] = []  # (ids, files present, acknowledged)
        self._original = self.store.write_usage
        self.store.write_usage = self._write  # type: ignore[method-assign]

    async def _write(self, records: list[UsageRecord]) -> None:
        ids = [r.request_id for r in records]
        files = batch_files(self.spool)
        if self.down or len(self.calls) in self.fail_calls:
            self.calls.append((ids, files, False))
            raise StoreUnavailable("the test took the usage store down")
        await self._original(records)
        self.calls.append((ids, files, True))


def batch_files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.glob("*.batch")) if spool.exists() else []


def spooled_ids(spool: Path) -> list[list[str]]:
    """Request ids of each spool file, oldest file first; every line is a whole record."""
    out = []
    for name in batch_files(spool):
        lines = (spool / name).read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert all(len(r) == len(FIELDS) for r in records), name
        out.append([r[0] for r in records])
    return out


async def spool_settled(gw: RunningGateway, spool: Path) -> int:
    """Wait until the writer's spool size counts every batch file on disk (it is updated just after
    the rename and the folder's fsync); return that size."""
    def size() -> int:
        return sum(p.stat().st_size for p in spool.glob("*.batch"))

    await wait_for(lambda: writer(gw).spool.size == size(), 5, what="the spool size")
    return size()


def writer(gw: RunningGateway) -> UsageWriter:
    assert gw.services.usage is not None
    return gw.services.usage


async def scrape(gw: RunningGateway) -> dict[Any, float]:
    conn = await Conn.open(gw.admin_port)
    try:
        resp = await conn.request("GET", "/metrics")
    finally:
        await conn.close()
    assert resp.status == 200
    return parse_metrics(resp.body.decode())


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every os.fsync call's descriptor (the spool must fsync each batch and its folder)."""
    calls: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


async def test_store_down_batches_spool_to_disk_and_replay_oldest_first(
    start: Start, store_url: str, spool_dir: Path, fsyncs: list[int]
) -> None:
    outages: list[Outage] = []
    gw = await start(usage={"batch_size": 3, "flush_interval": "100ms"},
                     setup=lambda g: outages.append(Outage(g, spool_dir)))
    outage = outages[0]
    outage.down = True
    ids: list[str] = []
    conn = await Conn.open(gw.port)
    try:
        for round_ in range(4):
            for i in range(3):
                ids.append((await conn.request("GET", f"/open/{round_}/{i}")).request_id)
            await wait_for(lambda n=round_ + 1: len(batch_files(spool_dir)) >= n, 5, what="a spooled batch")
    finally:
        await conn.close()
    size = await spool_settled(gw, spool_dir)
    files = batch_files(spool_dir)
    assert len(files) == 4
    assert spooled_ids(spool_dir) == [ids[0:3], ids[3:6], ids[6:9], ids[9:12]]
    assert len(fsyncs) >= 2 * len(files)  # each batch file, then its folder
    assert await usage_rows(store_url) == []
    metrics = await scrape(gw)
    assert total(metrics, "gateway_usage_spool_bytes") == size
    assert total(metrics, "gateway_usage_queue_depth") == 0
    assert total(metrics, "gateway_usage_store_up") == 0
    assert total(metrics, "gateway_usage_spooled_batches_total") == 4

    # Back up, but the second replayed write fails: the first file goes, the rest stay.
    outage.calls.clear()
    outage.fail_calls = {1}
    outage.down = False
    await wait_rows(store_url, 12)
    await wait_for(lambda: batch_files(spool_dir) == [], 5, what="an empty spool")
    calls = outage.calls
    assert [(c[0], c[2]) for c in calls] == [
        (ids[0:3], True), (ids[3:6], False), (ids[3:6], True), (ids[6:9], True), (ids[9:12], True),
    ]
    # each batch was written while its file still existed, and its file was the oldest one left
    assert [c[1] for c in calls] == [files, files[1:], files[1:], files[2:], files[3:]]
    assert metric(gw, "gateway_usage_spool_bytes") == 0
    assert metric(gw, "gateway_usage_store_up") == 1


async def test_spool_files_survive_a_restart_and_are_replayed_by_the_next_process(
    start: Start, store_url: str, spool_dir: Path
) -> None:
    outages: list[Outage] = []
    gw = await start(usage={"batch_size": 1000, "flush_interval": "60s"},
                     setup=lambda g: outages.append(Outage(g, spool_dir)))
    outages[0].down = True
    ids = [(await call(gw.port, "GET", f"/open/{i}")).request_id for i in range(5)]
    assert batch_files(spool_dir) == []  # still queued in memory
    await gw.close()  # shutdown: the store refuses, so the queue goes to the spool
    assert spooled_ids(spool_dir) == [ids]
    before = {p.name: p.read_bytes() for p in spool_dir.glob("*.batch")}

    gw2 = await start(usage={"flush_interval": "100ms"})
    ids.append((await call(gw2.port, "GET", "/open/after")).request_id)
    rows = await wait_rows(store_url, 6)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    # the file goes once the store has acknowledged its batch: just after the rows appear
    await wait_for(lambda: batch_files(spool_dir) == [], 5, what="the replayed spool file deleted")
    assert len(before) == 1 and not any(spool_dir.glob("*.tmp"))


async def test_postgres_stopped_then_started_nothing_lost(start: Start, pg_store_url: str, spool_dir: Path) -> None:
    pg = Postgres()
    gw = await start(store=pg_store_url, usage={"batch_size": 50, "flush_interval": "100ms", "write_timeout": "2s"})
    conn = await Conn.open(gw.port)
    ids: list[str] = []
    try:
        ids += [(await conn.request("GET", f"/open/before/{i}")).request_id for i in range(10)]
        await wait_rows(pg_store_url, 10)
        await pg.astop()
        try:
            for i in range(40):
                resp = await conn.request("GET", f"/open/during/{i}")
                assert resp.status == 200, resp.body
                ids.append(resp.request_id)
            await wait_for(lambda: sum(len(b) for b in spooled_ids(spool_dir)) == 40, 10,
                           what="40 spooled records")
            assert metric(gw, "gateway_usage_store_up") == 0
            assert metric(gw, "gateway_usage_spool_bytes") > 0
        finally:
            await pg.astart()
        ids += [(await conn.request("GET", f"/open/after/{i}")).request_id for i in range(10)]
    finally:
        await conn.close()
    rows = await wait_rows(pg_store_url, 60, timeout=20)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    await wait_for(lambda: batch_files(spool_dir) == [], 5, what="an empty spool")
    assert metric(gw, "gateway_usage_spool_bytes") == 0
    assert metric(gw, "gateway_usage_store_up") == 1


async def test_shed_at_the_spool_cap_answers_503_on_metered_routes(start: Start, store_url: str,
                                                                   spool_dir: Path) -> None:
    outages: list[Outage] = []
    gw = await start(usage={"spool_max_bytes": 64, "flush_interval": "50ms"},
                     setup=lambda g: outages.append(Outage(g, spool_dir)))
    _, key = await gw.services.keys.create("alice", scopes=["orders:read"])
    outages[0].down = True
    served = await call(gw.port, "GET", "/orders/1", bearer(key))
    assert served.status == 200
    await wait_for(lambda: batch_files(spool_dir), 5, what="a spooled batch")
    assert await spool_settled(gw, spool_dir) >= 64
    shed = [await call(gw.port, "GET", f"/orders/{i}", bearer(key)) for i in range(3)]
    for resp in shed:
        assert resp.status == 503, resp.body
        assert resp.code == "service_unavailable"
    metrics = await scrape(gw)
    assert total(metrics, "gateway_requests_total", route="orders", code="503") == 3
    assert total(metrics, "gateway_usage_spool_bytes") >= 64
    assert total(metrics, "gateway_usage_dropped_total") == 0

    outages[0].down = False  # the store is back: the spool drains, and the route serves again
    await wait_for(lambda: batch_files(spool_dir) == [], 5, what="an empty spool")
    again = await call(gw.port, "GET", "/orders/2", bearer(key))
    assert again.status == 200
    # every answer, the 503s too, has its record: shed loses nothing
    rows = await wait_rows(store_url, 5)
    assert sorted(r["request_id"] for r in rows) == sorted(r.request_id for r in [served, *shed, again])
    assert sorted(r["status"] for r in rows) == [200, 200, 503, 503, 503]
    assert metric(gw, "gateway_usage_dropped_total") == 0


async def test_drop_at_the_spool_cap_serves_and_counts_the_lost_records(start: Start, store_url: str,
                                                                        spool_dir: Path) -> None:
    outages: list[Outage] = []
    gw = await start(usage={"spool_max_bytes": 64, "flush_interval": "50ms", "on_spool_full": "drop"},
                     expect_drops=True, setup=lambda g: outages.append(Outage(g, spool_dir)))
    _, key = await gw.services.keys.create("alice", scopes=["orders:read"])
    outages[0].down = True
    first = await call(gw.port, "GET", "/orders/1", bearer(key))
    assert first.status == 200
    await wait_for(lambda: batch_files(spool_dir), 5, what="a spooled batch")
    await spool_settled(gw, spool_dir)
    for i in range(5):
        resp = await call(gw.port, "GET", f"/orders/{i}", bearer(key))
        assert resp.status == 200, resp.body  # served: `drop` never refuses
    await wait_for(lambda: metric(gw, "gateway_usage_dropped_total") == 5, 5, what="5 dropped records")
    metrics = await scrape(gw)
    assert total(metrics, "gateway_usage_dropped_total") == 5
    assert len(batch_files(spool_dir)) == 1  # nothing past the cap was written

    outages[0].down = False
    after = await call(gw.port, "GET", "/orders/after", bearer(key))
    rows = await wait_rows(store_url, 2)
    assert sorted(r["request_id"] for r in rows) == sorted([first.request_id, after.request_id])
    assert metric(gw, "gateway_usage_dropped_total") == 5


async def test_queue_and_spool_gauges_follow_the_state(start: Start, spool_dir: Path, store_url: str) -> None:
    outages: list[Outage] = []
    gw = await start(usage={"batch_size": 4, "flush_interval": "60s"},
                     setup=lambda g: outages.append(Outage(g, spool_dir)))
    outages[0].down = True
    metrics = await scrape(gw)
    assert total(metrics, "gateway_usage_queue_depth") == 0
    assert total(metrics, "gateway_usage_spool_bytes") == 0
    assert total(metrics, "gateway_usage_dropped_total") == 0
    for i in range(3):
        await call(gw.port, "GET", f"/open/{i}")
        assert total(await scrape(gw), "gateway_usage_queue_depth") == i + 1
    await call(gw.port, "GET", "/open/3")  # a full batch: to the store, which is down, so to the spool
    await wait_for(lambda: batch_files(spool_dir), 5, what="a spooled batch")
    size = await spool_settled(gw, spool_dir)
    metrics = await scrape(gw)
    assert total(metrics, "gateway_usage_queue_depth") == 0
    assert total(metrics, "gateway_usage_spool_bytes") == size > 0
    assert total(metrics, "gateway_usage_store_up") == 0
    assert total(metrics, "gateway_usage_dropped_total") == 0
    outages[0].down = False
    await gw.close()  # nothing queued; the spool stays for the next process
    assert batch_files(spool_dir)


def test_a_batch_that_cannot_be_removed_still_counts_against_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    record = UsageRecord("0190a0b0-0000-7000-8000-000000000001", 1.0, "k1", "alice", "live", "r", "GET",
                         200, 200, 1.5, 1.0, 10, 20, "192.0.2.1", None)
    stuck = spool.append([record])
    before = spool.size
    assert before == stuck.stat().st_size > 0
    unlink = Path.unlink

    def refuse(self: Path, missing_ok: bool = False) -> None:  # as for a file the process may not remove
        if self == stuck:
            raise PermissionError(13, "Permission denied", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(OSError):
        spool.remove(stuck)
    assert spool.size == before and stuck.exists()
