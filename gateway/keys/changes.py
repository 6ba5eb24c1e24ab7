"""Key changes made elsewhere reach this process within `keys.sync_interval`, not `keys.cache_ttl`.

A revocation (a rotation, a suspension, any change) made by the CLI, the admin API of another
process, a worker's supervisor or another replica sharing the store used to reach this process's
cache only when the cached entry expired, up to 30 s later. Every change to a key is written with
its audit entry in one transaction, so the audit log is a feed of changes: each serving process
reads the entries written since it last looked, every `keys.sync_interval` (a quarter second by
default), and forgets those keys; the next request with one reads the store.

Ids of entries committed out of order (PostgreSQL hands out ids before commit) are caught by also
reading entries written in the last LOOKBACK seconds; ids already applied are skipped. A store that
cannot be read leaves the cache TTL as the bound, as before.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from prometheus_client import Histogram

from gateway.clock import Clock
from gateway.keys.cache import KeyCache
from gateway.metrics import Metrics
from gateway.store.base import KeyStore, StoreUnavailable

log = logging.getLogger("gateway.keys")
LOOKBACK = 10.0  # seconds: longer than any key-change transaction stays open


class KeyChanges:
    def __init__(self, store: KeyStore, cache: KeyCache, clock: Clock, metrics: Metrics, interval: float) -> None:
        self.store = store
        self.cache = cache
        self.clock = clock
        self.interval = interval
        self.last_id = -1  # not read yet: start from the newest entry
        self.applied: dict[int, float] = {}  # ids seen within LOOKBACK, and when
        self._last_error = 0.0
        self.propagation = Histogram(
            "gateway_key_change_propagation_seconds",
            "From a key change written elsewhere to this process forgetting the key",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=metrics.registry,
        )

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except StoreUnavailable as e:
                now = self.clock.time()
                if now - self._last_error > 60:
                    self._last_error = now
                    log.warning("key changes could not be read (%s); cached keys expire after keys.cache_ttl", e)
            await asyncio.sleep(self.interval)

    async def poll(self) -> None:
        """Forget every key changed since the last poll."""
        now = self.clock.time()
        since = self.clock.now() - timedelta(seconds=LOOKBACK)
        first = self.last_id < 0
        if first:  # entries up to here are older than anything this process could have cached
            [(self.last_id, _, _)] = await self.store.key_changes(-1, since)
        start = self.last_id
        rows = await self.store.key_changes(start, since)
        applied = self.applied
        for entry_id, key_id, written in rows:
            if entry_id in applied:
                continue
            applied[entry_id] = now
            if entry_id > self.last_id:
                self.last_id = entry_id
            if first and entry_id <= start:
                continue
            self.cache.invalidate(key_id)
            self.propagation.observe(max(0.0, now - written))
        if applied:  # an id leaves the lookback LOOKBACK after it was written, before it was seen
            self.applied = {i: t for i, t in applied.items() if now - t <= LOOKBACK * 2}
