"""The SQLite store's usage writer: a child process that inserts the batches, so the GIL stays here.

A writer thread in the gateway's own process, however little Python it ran, took the GIL back from
the event loop at every row (sqlite3 releases it around each step), and the loop waited for it
milliseconds at a time (bench/usage_micro.py). A child has its own interpreter: the loop only
pickles a batch of plain tuples (about 0.3 µs a record) and writes it to a pipe.

Framing on both pipes: a 4-byte sequence number, a 4-byte length, then the body — a pickled list of
records one way, b"ok" or the error text back. Only the parent writes to the child's stdin; the
child never outlives its stdin (EOF: it finishes what it has and exits) and ignores SIGINT and
SIGTERM, so a terminal's Ctrl-C reaching the process group cannot kill it before the gateway's last
flush.

    python -m gateway.store.sqlite_usage_process PATH BUSY_TIMEOUT   (started by UsageProcess only)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import sqlite3
import struct
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from gateway.store.base import StoreUnavailable
from gateway.store.sqlite_usage_sql import INSERT_USAGE, MARK_USAGE
from gateway.store.sqlite_worker import open_connection, ts, write_transaction

if TYPE_CHECKING:
    from gateway.usage.record import UsageRecord

_HEAD = struct.Struct("!II")
_OK = b"ok"
EXIT_TIMEOUT = 10.0  # seconds the child gets to finish its batches when the store closes


class _Child:
    """One child process, the batches it was sent and not yet answered, and the task reading its replies."""

    def __init__(self, proc: asyncio.subprocess.Process, path: str) -> None:
        self.proc = proc
        self.path = path
        self.pending: dict[int, asyncio.Future[None]] = {}
        self.replies = asyncio.get_running_loop().create_task(self._read_replies())

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.replies.done()

    async def _read_replies(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            while True:
                seq, size = _HEAD.unpack(await stdout.readexactly(_HEAD.size))
                reply = await stdout.readexactly(size)
                fut = self.pending.get(seq)
                if fut is None or fut.done():
                    continue
                if reply == _OK:
                    fut.set_result(None)
                else:
                    fut.set_exception(StoreUnavailable(reply.decode(errors="replace")))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the child exited
        finally:
            # Only this child's batches: a new child may already be taking the next ones.
            err = StoreUnavailable(f"SQLite usage writer for {self.path} exited")
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(err)


def _child_env() -> dict[str, str]:
    """The gateway's environment, with the folder this `gateway` package was imported from first on
    the child's path: a gateway run from a checkout, not installed, must find the same code."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, path]) if path else root}


class UsageProcess:
    """The parent's end: one child per store, started on first use and again after it died."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._child: _Child | None = None
        self._seq = 0
        self._starting = asyncio.Lock()

    async def write(self, records: list[UsageRecord]) -> None:
        child = await self.start()
        stdin = child.proc.stdin
        assert stdin is not None
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        body = pickle.dumps([tuple(r) for r in records], pickle.HIGHEST_PROTOCOL)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        child.pending[seq] = fut
        try:
            stdin.write(_HEAD.pack(seq, len(body)) + body)
            await stdin.drain()
            await fut  # a batch abandoned by a timeout is answered later and ignored: writes are idempotent
        except (ConnectionError, BrokenPipeError) as e:
            raise StoreUnavailable(f"SQLite usage writer for {self.path} is gone ({type(e).__name__})") from None
        finally:
            child.pending.pop(seq, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: the child's exit may have failed it while we were sending
            else:
                fut.cancel()

    async def start(self) -> _Child:
        """The running child, started now if need be. Forking copies this process's page tables,
        milliseconds for a big heap: the gateway starts it before serving."""
        async with self._starting:
            child = self._child
            if child is not None and child.alive:
                return child
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", __name__, self.path, str(self.busy_timeout),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=_child_env(),
                )
            except OSError as e:
                raise StoreUnavailable(f"cannot start the SQLite usage writer ({type(e).__name__})") from None
            self._child = _Child(proc, self.path)
            return self._child

    async def close(self) -> None:
        """Lets the child finish what it was sent, then waits for it (killed if it hangs)."""
        async with self._starting:  # not while a child is being started
            child, self._child = self._child, None
        if child is None:
            return
        proc = child.proc
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await child.replies


# --- one batch: in the child, or on the store's thread for an in-memory database ---------------


CHUNK = 100  # records: about a millisecond of inserting


def write_records(
    conn: sqlite3.Connection, records: list[UsageRecord], path: str, pause: Callable[[], None] | None = None
) -> None:
    """One batch in one transaction; runs in the usage writer process, which passes a `pause` to call
    between chunks of CHUNK records, or on the store's thread for an in-memory database."""
    try:
        with write_transaction(conn):
            for i in range(0, len(records), CHUNK):
                conn.executemany(INSERT_USAGE, records[i : i + CHUNK])
                if pause is not None:
                    pause()
            conn.executemany(MARK_USAGE, _marks(records))
    except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:
        # Only the kind of error: the message could quote a record.
        raise StoreUnavailable(
            f"SQLite store {path}: a usage batch of {len(records)} records was not stored ({type(exc).__name__})"
        ) from None


def _second(at: float) -> int:
    """The stored time's whole second: the fraction rounded to the microsecond may carry."""
    whole = int(at)
    return whole + (round((at - whole) * 1e6) >= 1_000_000)


def _marks(records: list[UsageRecord]) -> list[tuple[str, str]]:
    """The hour and day buckets the records fall in, rounded to the microsecond as INSERT_USAGE
    stores their time. Records of a batch share one or two hours: one cheap pass over their times."""
    hours = {_second(r[1]) // 3600 for r in records}
    texts = {ts(datetime.fromtimestamp(h * 3600, UTC)) for h in hours}
    days = {t[:10] + "T00:00:00.000000Z" for t in texts}
    return sorted([("day", d) for d in days] + [("hour", h) for h in texts])


# --- the child -------------------------------------------------------------------------------------


# Between chunks of a batch the child offers its CPU: the kernel lets a running task finish its slice
# (3 ms or so) before a task it woke may run there, and the event loop's thread, woken on this CPU
# while the child inserts, waited that long. A yield with nothing else runnable costs a microsecond.
PAUSE = os.sched_yield


def _read(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def child(path: str, busy_timeout: float, inp: BinaryIO, out: BinaryIO) -> None:
    conn = open_connection(path, busy_timeout)
    try:
        while (head := _read(inp, _HEAD.size)) is not None:
            seq, size = _HEAD.unpack(head)
            body = _read(inp, size)
            if body is None:
                return
            try:
                write_records(conn, pickle.loads(body), path, PAUSE)  # noqa: S301 - our own parent's pipe
                reply = _OK
            except StoreUnavailable as e:
                reply = str(e).encode()
            out.write(_HEAD.pack(seq, len(reply)) + reply)
            out.flush()
    finally:
        conn.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # No wake-up preemption: woken by a batch on the pipe, a normal-policy child took the CPU from the
    # event loop that had just written it, for a slice of milliseconds (bench/usage_micro.py). Under
    # SCHED_BATCH it waits for the next tick or a free CPU, and still gets its fair share of CPU time.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    try:
        child(sys.argv[1], float(sys.argv[2]), sys.stdin.buffer, sys.stdout.buffer)
    except StoreUnavailable as e:  # the file cannot be opened: the parent sees EOF and spools
        print(f"gateway usage writer: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        pass  # the parent is gone


if __name__ == "__main__":
    main()
