"""The verified-key cache in front of the store.

Positive entries live at most `ttl` (≤ 30 s), so a revocation made elsewhere reaches this process
within that time (revocations made here evict at once). Unknown digests are remembered in a
size-bounded LRU, so a flood of made-up keys costs the store one lookup each at most once per
`negative_ttl`. One lookup per key at a time (single flight). With the store down, entries younger
than `max_stale` still serve; anything else is refused as unavailable, never let through.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections import OrderedDict
from dataclasses import replace
from email.utils import formatdate

from gateway.clock import Clock
from gateway.http.heads import header_value
from gateway.keys.digest import Peppers
from gateway.keys.model import KeyRecord
from gateway.metrics import Metrics
from gateway.store.base import KeyStore, StoreUnavailable

log = logging.getLogger("gateway.keys")
INF = float("inf")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class CachedKey:
    """A record plus what the hot path needs precomputed from it."""

    __slots__ = (
        "expiry", "fetched", "granted", "networks", "owner_header", "record", "rotating", "scopes_header", "sunset"
    )

    def __init__(self, record: KeyRecord, fetched: float) -> None:
        self.record = record
        self.fetched = fetched
        exp = record.effective_expiry()
        self.expiry = exp.timestamp() if exp is not None else INF
        self.sunset = formatdate(self.expiry, usegmt=True).encode() if exp is not None else None
        self.rotating = record.rotated_to is not None
        self.granted, self.scopes_header = _granted(record.scopes)
        self.owner_header = header_value(record.owner)
        self.networks = _networks(record.allow_ips) if record.allow_ips else None


# Keys mostly share a handful of scope sets and allowlists: one object each, not one per key, keeps
# the long-lived heap that every full garbage collection walks smaller (bench `keys_100k`).
@functools.lru_cache(maxsize=4096)
def _granted(scopes: tuple[str, ...]) -> tuple[frozenset[str], bytes]:
    return frozenset(scopes), header_value(" ".join(scopes))


@functools.lru_cache(maxsize=4096)
def _networks(allow_ips: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in allow_ips)


def _unchanged(cached: KeyRecord, stored: KeyRecord) -> bool:
    """Equal in all but the last-used time, which the hot path never reads."""
    return replace(stored, last_used_at=cached.last_used_at) == cached


class KeyCache:
    def __init__(
        self,
        store: KeyStore,
        peppers: Peppers,
        clock: Clock,
        metrics: Metrics,
        *,
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        negative_size: int = 100_000,
        max_stale: float = 300.0,
        size: int = 100_000,
    ) -> None:
        self.store = store
        self.peppers = peppers
        self.clock = clock
        self.metrics = metrics
        self.ttl = min(ttl, 30.0)
        self.negative_ttl = negative_ttl
        self.negative_size = negative_size
        self.max_stale = max_stale
        self.size = size
        self.positive: OrderedDict[bytes, CachedKey] = OrderedDict()
        self.negative: OrderedDict[bytes, float] = OrderedDict()
        self.by_id: dict[str, bytes] = {}
        self.generation = 0  # invalidations so far
        # Keys invalidated while a store read was under way, and when (generation): that read's record
        # may predate the change. Kept only while reads are in flight.
        self.changed: dict[str, int] = {}
        self.inflight: dict[bytes, asyncio.Future[CachedKey | None]] = {}
        self.store_calls = 0

    def fresh(self, digest: bytes, now: float) -> CachedKey | None:
        """The entry if it is fresh enough to use without the store (the hot path)."""
        entry = self.positive.get(digest)
        if entry is not None and now - entry.fetched < self.ttl:
            return entry
        return None

    def known_unknown(self, digest: bytes, now: float) -> bool:
        until = self.negative.get(digest)
        if until is None:
            return False
        if until > now:
            return True
        del self.negative[digest]
        return False

    async def lookup(self, key: bytes, digest: bytes) -> CachedKey | None:
        """Fetch from the store, one call per digest at a time; None for an unknown key."""
        pending = self.inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[CachedKey | None] = asyncio.get_running_loop().create_future()
        self.inflight[digest] = fut
        try:
            entry = await self._fetch(key, digest)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved here: waiters re-raise it
            raise
        else:
            fut.set_result(entry)
            return entry
        finally:
            del self.inflight[digest]
            if not self.inflight:
                self.changed.clear()

    async def _fetch(self, key: bytes, digest: bytes) -> CachedKey | None:
        now = self.clock.time()
        generation = self.generation
        versions = self.peppers.digests(key)
        try:
            self.store_calls += 1
            record = await self.store.find_by_digests([d for _, d in versions])
            self.metrics.store_up.set(1)
        except StoreUnavailable:
            self.metrics.store_up.set(0)
            stale = self.positive.get(digest)
            if stale is not None and now - stale.fetched < self.max_stale:
                self.metrics.cache("stale")
                return stale
            raise
        if record is None:
            self.negative[digest] = now + self.negative_ttl
            self.negative.move_to_end(digest)
            while len(self.negative) > self.negative_size:
                self.negative.popitem(last=False)
            return None
        if record.pepper_version != self.peppers.current.version:
            await self._redigest(record, digest)
        if self.changed.get(record.id, -1) >= generation:
            # This key changed while the read was under way (a revocation from the change feed, say):
            # the record may predate it. It serves this request, and is not cached.
            return CachedKey(record, now)
        old = self.positive.get(digest)
        if old is not None and _unchanged(old.record, record):
            # The old entry lives on, and what stages built from its record (limit plans): a new one
            # per key and TTL made the long-lived heap churn, and with 10^5 keys each full garbage
            # collection that followed held the loop for about 100 ms (bench `keys_100k`).
            old.fetched = now
            self.positive.move_to_end(digest)
            return old
        entry = CachedKey(record, now)
        self.put(digest, entry)
        return entry

    async def _redigest(self, record: KeyRecord, digest: bytes) -> None:
        """A key found under an old pepper moves to the current one, so the old can be retired."""
        record.digest = digest
        record.pepper_version = self.peppers.current.version
        try:
            await self.store.set_digest(record.id, digest, record.pepper_version)
        except (StoreUnavailable, KeyError, ValueError):
            log.warning("could not move key %s to the current pepper; will retry on next lookup", record.id)

    def put(self, digest: bytes, entry: CachedKey) -> None:
        self.positive[digest] = entry
        self.positive.move_to_end(digest)
        self.by_id[entry.record.id] = digest
        while len(self.positive) > self.size:
            _, old = self.positive.popitem(last=False)
            self.by_id.pop(old.record.id, None)

    def invalidate(self, key_id: str) -> None:
        """Forget a changed or revoked key: the next request reads the store."""
        if self.inflight:
            self.changed[key_id] = self.generation
        self.generation += 1
        digest = self.by_id.pop(key_id, None)
        if digest is not None:
            self.positive.pop(digest, None)
