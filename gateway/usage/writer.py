"""The usage writer: a bounded queue filled after each response, drained in batches off the hot path.

Batches go to the store (≤ `batch_size` records or ≤ `flush_interval` old). When the store fails
or is slow, they go to the disk spool instead, and are replayed oldest first once it answers again.
With the spool at its cap, `on_spool_full: shed` makes metered routes answer 503 (a request that
cannot be billed is not served); `drop` serves and counts what is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

from prometheus_client import Counter, Gauge

from gateway.metrics import Metrics
from gateway.store.base import StoreUnavailable, UsageStore
from gateway.usage.record import UsageRecord
from gateway.usage.spool import Spool

log = logging.getLogger("gateway.usage")


class UsageWriter:
    def __init__(
        self,
        store: UsageStore,
        spool: Spool,
        metrics: Metrics,
        *,
        policy: str = "shed",
        batch_size: int = 1000,
        interval: float = 1.0,
        queue_max: int = 100_000,
        write_timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.spool = spool
        self.policy = policy
        self.batch_size = batch_size
        self.interval = interval
        self.queue_max = queue_max
        self.write_timeout = write_timeout
        self.queue: deque[UsageRecord] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.store_ok = True
        r = metrics.registry
        self.dropped = Counter("gateway_usage_dropped_total", "Usage records lost (stays 0 under shed)", registry=r)
        self.written = Counter("gateway_usage_written_total", "Usage records acknowledged by the store", registry=r)
        self.spooled = Counter("gateway_usage_spooled_batches_total", "Batches written to the disk spool", registry=r)
        Gauge("gateway_usage_queue_depth", "Usage records waiting in memory", registry=r).set_function(
            lambda: len(self.queue)
        )
        Gauge("gateway_usage_spool_bytes", "Bytes of usage batches in the disk spool", registry=r).set_function(
            lambda: self.spool.size
        )
        Gauge("gateway_usage_store_up", "1 when the last usage write reached the store", registry=r).set_function(
            lambda: 1 if self.store_ok else 0
        )

    @property
    def full(self) -> bool:
        """Nothing more can be kept safely: the spool is at its cap or the queue at its bound."""
        return not self.spool.has_room() or len(self.queue) >= self.queue_max

    def put(self, record: UsageRecord) -> None:
        """O(1) and never blocks: called after each response."""
        q = self.queue
        if len(q) >= self.queue_max and (self.policy == "drop" or len(q) >= 2 * self.queue_max):
            self.dropped.inc()
            return
        q.append(record)
        if len(q) >= self.batch_size:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.store.start_usage_writes()
        except StoreUnavailable as e:  # the first write tries again, and spools if it must
            log.warning("usage store not ready (%s)", e)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                while self.queue:
                    await self._deliver(self._take())
                    if len(self.queue) < self.batch_size:
                        break
                if self.store_ok or not self.queue:
                    await self._replay()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("usage writer failed; retrying")

    def _take(self) -> list[UsageRecord]:
        q = self.queue
        n = min(len(q), self.batch_size)
        return [q.popleft() for _ in range(n)]

    async def _deliver(self, batch: list[UsageRecord]) -> None:
        if self.store_ok and await self._write(batch):
            return
        await self._to_spool(batch)

    async def _write(self, batch: list[UsageRecord]) -> bool:
        try:
            await asyncio.wait_for(self.store.write_usage(batch), self.write_timeout)
        except (StoreUnavailable, TimeoutError) as e:
            if self.store_ok:
                log.warning("usage store unavailable (%s); spooling to %s", type(e).__name__, self.spool.directory)
            self.store_ok = False
            return False
        if not self.store_ok:
            log.warning("usage store is back; replaying the spool")
        self.store_ok = True
        self.written.inc(len(batch))
        return True

    async def _to_spool(self, batch: list[UsageRecord]) -> None:
        if not self.spool.has_room() and self.policy == "drop":
            # A record is lost only when neither the spool nor the store can take it: the store may
            # be back since the last write failed (the replay would only notice with an empty queue).
            if not await self._write(batch):
                self.dropped.inc(len(batch))
            return
        # Under `shed` the cap is enforced by refusing new metered requests; what was already
        # served is written even past it, never lost.
        await asyncio.to_thread(self.spool.append, batch)
        self.spooled.inc()

    async def _replay(self) -> None:
        """Send spooled batches oldest first; each file is deleted only once the store has it."""
        files = self.spool.files()
        if not files:
            return
        if not self.store_ok and not await self._probe():
            return
        for path in files:
            batch = await asyncio.to_thread(Spool.read, path)
            if not await self._write(batch):
                return
            await asyncio.to_thread(self.spool.remove, path)

    async def _probe(self) -> bool:
        try:
            await asyncio.wait_for(self.store.ping(), self.write_timeout)
        except (StoreUnavailable, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        """On shutdown: everything queued reaches the store or the spool before the process exits."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self.queue:
            batch = self._take()
            if not (self.store_ok and await self._write(batch)):
                await asyncio.to_thread(self.spool.append, batch)
                self.spooled.inc()
