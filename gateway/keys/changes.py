"""Key changes made elsewhere reach this process within `keys.sync_interval`, not `keys.cache_ttl`.

A revocation (a rotation, a suspension, any change) made by the CLI, the admin API of another
process, a worker's supervisor or another replica sharing the store used to reach this process's
cache only when the cached entry expired, up to 30 s later. Every change to a key is written with
its audit entry in one transaction, so the audit log is a feed of changes: each serving process
reads the entries written since it last looked, every `keys.sync_interval` (a quarter second by
default), and forgets those keys; the next request with one reads the store.

Entries are read by id, a page at a time (an index range, however long the log). PostgreSQL hands
out ids before commit, so a later id can be read before an earlier one exists: each id skipped is
remembered for LOOKBACK seconds and looked up again at every poll until it appears (or, taken by a
transaction that rolled back, never does). A store that cannot be read leaves the cache's own
bounds: entries are re-read after keys.cache_ttl, or served up to keys.max_stale while it is down.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Histogram

from gateway.clock import Clock
from gateway.keys.cache import KeyCache
from gateway.metrics import Metrics
from gateway.store.base import KeyStore, StoreUnavailable

log = logging.getLogger("gateway.keys")
LOOKBACK = 10.0  # seconds: longer than any key-change transaction stays open
PAGE = 1000  # entries read at once
MAX_GAPS = 10_000  # skipped ids remembered at most
START_WINDOW = 1000  # ids below the newest that a first poll checks for ones not committed yet


class KeyChanges:
    def __init__(self, store: KeyStore, cache: KeyCache, clock: Clock, metrics: Metrics, interval: float) -> None:
        self.store = store
        self.cache = cache
        self.clock = clock
        self.interval = interval
        self.last_id = -1  # not read yet: start from the newest entry
        self.gaps: dict[int, float] = {}  # ids skipped (not committed when read past), and when
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
            except Exception as e:  # whatever it was, the next poll tries again: this loop never ends early
                now = self.clock.time()
                if now - self._last_error > 60:
                    self._last_error = now
                    if isinstance(e, StoreUnavailable):
                        log.warning("key changes could not be read (%s); cached keys are re-read after "
                                    "keys.cache_ttl", e)
                    else:
                        log.exception("reading key changes failed; cached keys are re-read after keys.cache_ttl")
            await asyncio.sleep(self.interval)

    async def poll(self) -> None:
        """Forget every key changed since the last poll."""
        store = self.store
        now = self.clock.time()
        if self.last_id < 0:
            # Start from the newest entry. Ids just below it may not have committed yet (PostgreSQL):
            # those missing now are gaps like any other, read once they appear.
            [(last, _, _)] = await store.key_changes(-1)
            recent = list(range(max(1, last - START_WINDOW + 1), last + 1))
            present = {i for i, _, _ in await store.key_changes_among(recent)}
            self.gaps = {i: now for i in recent if i not in present}
            self.last_id = last
            return
        while True:
            page = await store.key_changes(self.last_id, PAGE)
            expected = self.last_id + 1
            for entry_id, key_id, written in page:
                if entry_id - expected <= MAX_GAPS:
                    for skipped in range(expected, entry_id):
                        self.gaps[skipped] = now
                expected = entry_id + 1
                self._apply(key_id, now, written)
            if page:
                self.last_id = page[-1][0]
            if len(page) < PAGE:
                break
        gaps = self.gaps
        if gaps:
            for entry_id, key_id, written in await store.key_changes_among(list(gaps)):
                del gaps[entry_id]
                self._apply(key_id, now, written)
            expired = [i for i, seen in gaps.items() if now - seen > LOOKBACK]
            for i in expired:
                del gaps[i]
            while len(gaps) > MAX_GAPS:
                del gaps[next(iter(gaps))]

    def _apply(self, key_id: str, now: float, written: float) -> None:
        if key_id:  # entries about no key (a failed admin login) change nothing here
            self.cache.invalidate(key_id)
            self.propagation.observe(max(0.0, now - written))
