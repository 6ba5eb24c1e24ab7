"""`memory://` under `gateway run --workers N`: a limits process holds the counters, the workers ask it.

Each worker used to keep counters of its own, so a key admitted N times its limits across N workers:
the kernel spreads a client's connections over them (SO_REUSEPORT). Now one process beside the
workers, forked by the supervisor (`host.py`), runs the one MemoryLimiter, and each worker reaches
it over a Unix socket pair made before the fork. As with Redis, every hit of one event-loop tick goes
in one frame, and each frame is answered with one. A worker whose answer does not come within
`ratelimit.timeout` applies `ratelimit.on_backend_error`, its share being the limit ÷ the number of
workers.

The brute-force throttle is shared the same way, whatever the limiter's backend: a worker reports
each failed authentication, the limits process counts them per client address for all workers, and
when an address is to cool down it tells every worker, whose own check stays a dict lookup.

Both ends are this gateway's own processes (a pair made before the fork, never a listening socket);
marshal, not pickle, because the bodies are plain data and marshal calls no constructor.
"""

from __future__ import annotations

import asyncio
import marshal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.anomalies import AUTH_FAILURES, Anomaly
from gateway.ratelimit.base import LATE, Counters, Limiter, LimiterUnavailable
from gateway.ratelimit.frames import NOTICE, Frames
from gateway.ratelimit.policy import Decision, Outcome

if TYPE_CHECKING:
    from gateway.http.exchange import Exchange

MAX_BACKLOG = 1024 * 1024  # bytes not yet taken by the limits process, past which observations are dropped

# One queued hit: counters, cost and the caller's future.
Entry = tuple[Counters, int, "asyncio.Future[Decision]"]


@dataclass(frozen=True)
class WorkerLink:
    """What a worker gets from the supervisor: its end of the socket pair to the limits process, and how
    many workers share."""

    sock: socket.socket
    workers: int


class _WorkerEnd(Frames):
    def __init__(self, limiter: SharedLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    def on_frame(self, seq: int, body: bytes) -> None:
        if seq == NOTICE:
            self.limiter._notice(body)
        else:
            self.limiter._answered(seq, body)

    def on_lost(self) -> None:
        self.limiter._lost()


class SharedLimiter(Limiter):
    """A worker's limiter: the hits of one tick go to the limits process in one frame."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self._queue: list[Entry] = []
        self._flush_scheduled = False
        self._end: _WorkerEnd | None = None
        self._connecting = False
        self._pending: dict[int, tuple[list[Entry], asyncio.TimerHandle]] = {}
        self._seq = 0
        self._closed = False
        self.frames = 0
        self._failures: list[str] = []
        self._seen: list[tuple[str | None, str, str, str]] = []
        self.on_block: Callable[[str, float], None] | None = None  # the worker's throttle, told of cool-downs
        self.on_anomaly: Callable[[Anomaly], None] | None = None  # the worker's services, to record one
        self.dropped_observations = 0

    def observe(self, key_id: str | None, ip: str, code: str, prefix: str) -> None:
        """A finished exchange, for the anomaly detector in the limits process (sent with this tick's hits).
        Dropped (and counted) while the limits process is not keeping up: its rate-limit answers queue
        behind what was sent before, and must not wait for a backlog of observations."""
        if self._closed:
            return
        end = self._end
        if end is not None and end.transport is not None and end.transport.get_write_buffer_size() > MAX_BACKLOG:
            self.dropped_observations += 1
            return
        self._seen.append((key_id, ip, code, prefix))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def report_failure(self, ip: str) -> None:
        """A failed authentication from `ip`, for the limits process's count (sent with this tick's hits)."""
        if self._closed:
            return
        self._failures.append(ip)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def hit(self, counters: Counters, cost: int = 1) -> asyncio.Future[Decision]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision] = loop.create_future()
        if self._closed or (self._end is not None and self._end.lost):
            fut.set_exception(LimiterUnavailable("limits process: not reachable"))
            return fut
        self._queue.append((counters, cost, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._queue and not self._failures and not self._seen:
            return
        end = self._end
        if end is None:
            if not self._connecting:  # the queue goes out once connected
                self._connecting = True
                asyncio.get_running_loop().create_task(self._connect())
            return
        if self._failures or self._seen:
            notice = (self._failures, self._seen)
            self._failures, self._seen = [], []
            if not end.lost:
                end.send(NOTICE, marshal.dumps(notice))
        batch, self._queue = self._queue, []
        if not batch:
            return
        if end.lost:
            _fail(batch, LimiterUnavailable("limits process: not reachable"))
            return
        self._seq = seq = self._seq % 0xFFFFFFFF + 1  # 1..2^32-1: 0 is NOTICE
        body = marshal.dumps([(c.encoded or _encode(c), cost) for c, cost, _ in batch])
        end.send(seq, body)
        self.frames += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        self._pending[seq] = (batch, loop.call_at(deadline, self._expired, seq, deadline, True))

    async def connect(self) -> None:
        """Start reading the limits process's end now, not at the first hit: a worker that never failed an
        authentication nor hit a limit must still hear of the addresses it is to cool down."""
        if self._end is None and not self._connecting and not self._closed:
            self._connecting = True
            await self._connect()

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, end = await loop.create_unix_connection(lambda: _WorkerEnd(self), sock=self.sock)
        except OSError as e:
            self._closed = True
            queued, self._queue = self._queue, []
            _fail(queued, LimiterUnavailable(f"limits process: {type(e).__name__}"))
            return
        finally:
            self._connecting = False
        self._end = end
        self._flush()

    def _expired(self, seq: int, deadline: float, first: bool) -> None:
        loop = asyncio.get_running_loop()
        entry = self._pending.get(seq)
        if entry is None:
            return
        if first and loop.time() - deadline > LATE:
            # This loop woke late: the answer may be waiting unread. One more timeout from now.
            self._pending[seq] = (entry[0], loop.call_later(self.timeout, self._expired, seq, deadline, False))
            return
        del self._pending[seq]
        # The limits process may still decide these hits and answer: that answer is dropped (as a slow
        # Redis's is), and the failure policy decides them now.
        _fail(entry[0], LimiterUnavailable("limits process: timeout"))

    def _answered(self, seq: int, body: bytes) -> None:
        entry = self._pending.pop(seq, None)
        if entry is None:
            return  # answered after its timeout
        batch, timer = entry
        timer.cancel()
        try:
            replies = marshal.loads(body)  # noqa: S302 - from our own limits process, over a socket pair
        except (ValueError, EOFError, TypeError):
            _fail(batch, LimiterUnavailable("limits process: unreadable answer"))
            return
        for (counters, _, fut), reply in zip(batch, replies, strict=False):
            if fut.done():
                continue  # the caller went away
            try:
                outcomes = []
                i = 1
                for limit in counters.limits:
                    outcomes.append(Outcome(limit, reply[i], reply[i + 1], reply[i + 2]))
                    i += 3
                fut.set_result(Decision(bool(reply[0]), outcomes))
            except (TypeError, IndexError):  # never a hang
                fut.set_exception(LimiterUnavailable("limits process: unexpected answer"))
        _fail(batch[len(replies) :], LimiterUnavailable("limits process: answer too short"))

    def _notice(self, body: bytes) -> None:
        """Cool-downs for every worker, and anomalies this worker's exchanges set off, to record."""
        try:
            blocks, events = marshal.loads(body)  # noqa: S302 - from our own limits process, over a socket pair
            if self.on_block is not None:
                for ip, until in blocks:
                    self.on_block(ip, until)
            if self.on_anomaly is not None:
                for kind, key_id, subject, detail, at, action in events:
                    self.on_anomaly(Anomaly(kind, key_id, subject, detail, at, action))
        except (ValueError, EOFError, TypeError):
            pass  # not a notice of ours; this worker's own throttle count still holds

    def _lost(self) -> None:
        pending, self._pending = self._pending, {}
        for batch, timer in pending.values():
            timer.cancel()
            _fail(batch, LimiterUnavailable("limits process: not reachable"))
        queued, self._queue = self._queue, []
        _fail(queued, LimiterUnavailable("limits process: not reachable"))

    async def close(self) -> None:
        self._closed = True
        if self._end is not None and self._end.transport is not None:
            self._end.transport.close()
        else:
            self.sock.close()
        self._lost()


def _encode(counters: Counters) -> bytes:
    blob = marshal.dumps((counters.keys, tuple((lim.name, lim.count, lim.period) for lim in counters.limits)))
    counters.encoded = blob
    return blob


def _fail(entries: list[Entry], err: LimiterUnavailable) -> None:
    for _, _, fut in entries:
        if not fut.done():
            fut.set_exception(err)


class RemoteDetector:
    """A worker's anomaly detection under `--workers N`: each exchange goes to the one detector in the
    limits process, which sees every worker's traffic (thresholds hold across workers)."""

    def __init__(self, shared: SharedLimiter) -> None:
        self.shared = shared

    def observe(self, ex: Exchange) -> None:
        p = ex.principal
        if p is None and ex.error_code not in AUTH_FAILURES:
            return  # the detector looks at keys and failed authentications only: nothing to send
        self.shared.observe(p.record.id if p is not None else None, ex.client_ip, ex.error_code, ex.key_prefix)


class DroppedObservations(Collector):
    """`gateway_anomaly_observations_dropped_total`: exchanges a worker did not send the detector
    because the limits process was not keeping up (a plain int, read at a scrape)."""

    def __init__(self, shared: SharedLimiter) -> None:
        self.shared = shared

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(
            "gateway_anomaly_observations_dropped",
            "Exchanges not sent to the anomaly detector while the limits process lagged",
        )
        fam.add_metric([], self.shared.dropped_observations)
        yield fam
