"""The SQLite store's usage writer process: batches stored by a child, which is restarted when it
dies, survives the signals a terminal sends the process group, and finishes its work on close."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store import StoreUnavailable
from gateway.store.sqlite import SQLiteStore
from gateway.usage.record import UsageRecord

T0 = 1_732_780_800.0  # 2024-11-28T08:00:00Z


def records(first: int, n: int) -> list[UsageRecord]:
    return [
        UsageRecord(f"0190a0b0-0000-7000-8000-{i:012d}", T0 + i / 1000, "k1", "alice", "live", "orders", "GET",
                    200, 200, 1.5, 1.0, 10, 20, "192.0.2.1", None)
        for i in range(first, first + n)
    ]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(f"sqlite:///{tmp_path}/gw.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def child_pid(store: SQLiteStore) -> int:
    child = store._usage_process._child if store._usage_process else None
    assert child is not None and child.alive, "no usage writer process"
    return child.proc.pid


async def test_batches_are_stored_by_a_child_process_that_does_not_preempt_the_loop(store: SQLiteStore) -> None:
    await store.start_usage_writes()
    pid = child_pid(store)
    await store.write_usage(records(0, 1000))
    assert os.sched_getscheduler(pid) == os.SCHED_BATCH  # set by the child before it reads a batch
    await store.write_usage(records(500, 1000))  # overlapping: idempotent
    assert await store.count_usage() == 1500
    assert child_pid(store) == pid


async def test_time_is_stored_as_text_to_the_microsecond(store: SQLiteStore) -> None:
    r = records(0, 1)[0]._replace(at=T0 + 3599.9999996)  # rounds up into the next hour
    await store.write_usage([r, records(1, 1)[0]._replace(at=T0 + 0.123456)])

    def stored(conn: object) -> list[tuple[str, str]]:
        return conn.execute("SELECT at, request_id FROM usage_records ORDER BY at").fetchall()  # type: ignore[attr-defined]

    def marks(conn: object) -> list[tuple[str, str]]:
        return conn.execute("SELECT grain, bucket FROM usage_rollup_pending ORDER BY 1, 2").fetchall()  # type: ignore[attr-defined]

    assert [at for at, _ in await store._run(stored)] == [
        "2024-11-28T08:00:00.123456Z", "2024-11-28T09:00:00.000000Z"]
    assert await store._run(marks) == [
        ("day", "2024-11-28T00:00:00.000000Z"),
        ("hour", "2024-11-28T08:00:00.000000Z"), ("hour", "2024-11-28T09:00:00.000000Z")]


async def test_a_killed_child_fails_its_batch_and_a_new_one_takes_the_next(store: SQLiteStore) -> None:
    await store.write_usage(records(0, 10))
    first = child_pid(store)
    os.kill(first, signal.SIGKILL)
    with pytest.raises(StoreUnavailable):
        for _ in range(50):  # until the parent has noticed the exit
            await store.write_usage(records(10, 10))
            await asyncio.sleep(0.02)
    await store.write_usage(records(10, 10))
    assert child_pid(store) != first
    assert await store.count_usage() == 20


async def test_the_child_ignores_sigint_and_sigterm(store: SQLiteStore) -> None:
    await store.write_usage(records(0, 10))  # answered: the child set its signals up before reading
    pid = child_pid(store)
    ignored = int(Path(f"/proc/{pid}/status").read_text().split("SigIgn:")[1].split()[0], 16)
    assert ignored >> (signal.SIGINT - 1) & 1 and ignored >> (signal.SIGTERM - 1) & 1
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await store.write_usage(records(10, 10))
    assert child_pid(store) == pid
    assert await store.count_usage() == 20


async def test_close_lets_the_child_finish_what_it_was_sent(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/gw.db"
    s = SQLiteStore(url)
    await s.open()
    await s.start_usage_writes()
    writer = s._usage_process
    assert writer is not None and writer._child is not None
    child = writer._child
    pending = [asyncio.ensure_future(s.write_usage(records(i * 1000, 1000))) for i in range(5)]
    for _ in range(200):  # until all five are sent, none answered yet
        if len(child.pending) == 5:
            break
        await asyncio.sleep(0)
    assert len(child.pending) == 5
    await s.close()
    assert all(p.done() for p in pending)
    await asyncio.gather(*pending)  # every one acknowledged, none failed
    assert writer._child is None and child.proc.returncode == 0
    again = SQLiteStore(url)
    await again.open()
    try:
        assert await again.count_usage() == 5000
    finally:
        await again.close()


async def test_a_batch_the_store_refuses_is_an_error_that_quotes_no_record(store: SQLiteStore) -> None:
    bad = records(0, 3)
    bad[1] = bad[1]._replace(method=None)  # NOT NULL
    with pytest.raises(StoreUnavailable) as e:
        await store.write_usage(bad)
    assert str(e.value).endswith(": a usage batch of 3 records was not stored (IntegrityError)")
    assert "0190a0b0" not in str(e.value)
    assert await store.count_usage() == 0  # all of the batch or none
    await store.write_usage(records(0, 3))  # the same child goes on
    assert await store.count_usage() == 3


async def test_an_in_memory_store_writes_on_its_thread() -> None:
    s = SQLiteStore("sqlite:///:memory:")
    await s.open()
    try:
        await s.write_usage(records(0, 100))
        assert s._usage_process is None
        assert await s.count_usage() == 100
    finally:
        await s.close()


async def test_a_bad_record_late_in_a_batch_leaves_none_of_it(store: SQLiteStore) -> None:
    """The child inserts a batch in chunks, pausing between them, inside one transaction."""
    from gateway.store.sqlite_usage_process import CHUNK

    bad = records(0, 3 * CHUNK)
    bad[-1] = bad[-1]._replace(status=None)  # NOT NULL, in the last chunk
    with pytest.raises(StoreUnavailable):
        await store.write_usage(bad)
    assert await store.count_usage() == 0
    await store.write_usage(records(0, 3 * CHUNK + 1))
    assert await store.count_usage() == 3 * CHUNK + 1


async def test_stored_times_are_what_datetime_makes_of_them(store: SQLiteStore) -> None:
    """The SQL conversion against datetime.fromtimestamp, over times like time.time()'s (at this
    epoch, time * 1e6 often falls on a .5 tie, which the two must round alike)."""
    import random
    from datetime import UTC, datetime

    from gateway.store.sqlite_worker import ts

    rng = random.Random(7)
    times = [T0 + rng.uniform(0, 86400 * 365) for _ in range(20_000)]
    times += [T0 + 0.0000005, T0 + 0.9999995, T0 + 3599.9999999, T0 + 1e-7]
    # Exact ties: k/128 of a second is k * 7812.5 µs, halves that go to the even neighbour, either way.
    times += [T0 + k / 128 for k in range(1, 128, 2)]
    batch = [r._replace(at=t) for r, t in zip(records(0, len(times)), times, strict=True)]
    await store.write_usage(batch)

    def stored(conn: object) -> list[tuple[str, str]]:
        return conn.execute("SELECT request_id, at FROM usage_records").fetchall()  # type: ignore[attr-defined]

    got = dict(await store._run(stored))
    wrong = [(r.at, got[r.request_id]) for r in batch if got[r.request_id] != ts(datetime.fromtimestamp(r.at, UTC))]
    assert wrong == []


async def test_a_key_lookup_never_waits_behind_a_write_waiting_for_the_lock(store: SQLiteStore) -> None:
    """Another process (here a plain connection) holds the write lock; the store's own write waits
    for it in SQLite's busy handler, which sleeps up to 100 ms at a time. Lookups have their own
    connection and thread: they answer at once meanwhile."""
    from datetime import UTC, datetime

    from tests.store.test_key_store import audit, make_key

    record = make_key("k1", 1)
    await store.insert_key(record, audit("created", "k1"))
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        touch = asyncio.ensure_future(store.touch({"k1": datetime.now(UTC)}))
        await asyncio.sleep(0.05)
        assert not touch.done(), "the write should be waiting for the lock"
        # On the writer's thread it would wait behind the touch, which waits for the lock until the
        # busy timeout (5 s): a second is slack for a loaded machine, not for that.
        found = await asyncio.wait_for(store.find_by_digests([record.digest]), 1.0)
        assert found is not None and found.id == "k1"
    finally:
        other.execute("COMMIT")
        other.close()
    await touch


async def test_a_write_after_close_is_refused_and_starts_no_writer(tmp_path: Path) -> None:
    s = SQLiteStore(f"sqlite:///{tmp_path}/gw.db")
    await s.open()
    await s.write_usage(records(0, 10))
    await s.close()
    with pytest.raises(StoreUnavailable, match="not open"):
        await s.write_usage(records(10, 10))
    assert s._usage_process is None  # no child process left behind


async def test_usage_records_carry_only_the_indexes_the_reports_read(store: SQLiteStore) -> None:
    def indexes(conn: sqlite3.Connection) -> set[str]:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_records'")
        return {name for (name,) in rows if not name.startswith("sqlite_autoindex")}

    assert await store._run(indexes) == {"usage_records_at_idx", "usage_records_key_id_at_idx"}
