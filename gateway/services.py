"""What the pipeline's stages share in one process: store, peppers, key cache, metrics, clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from gateway.clock import Clock
from gateway.config.schema import GatewayConfig
from gateway.keys.cache import KeyCache
from gateway.keys.format import KeyFormat
from gateway.keys.peppers import load_peppers
from gateway.keys.service import KeyService
from gateway.metrics import Metrics
from gateway.ratelimit.base import Limiter
from gateway.ratelimit.failover import FailoverLimiter
from gateway.ratelimit.memory import MemoryLimiter
from gateway.stages.auth import KeyAuth
from gateway.stages.throttle import AuthThrottle
from gateway.store import KeyStore, StoreUnavailable, open_store

log = logging.getLogger("gateway")


def build_limiter(config: GatewayConfig, clock: Clock, metrics: Metrics) -> Limiter:
    """memory:// (embedded) or redis:// behind the configured failure policy."""
    rl = config.ratelimit
    if rl.backend.startswith("memory"):
        return MemoryLimiter(clock)
    from gateway.ratelimit.redis import RedisLimiter

    return FailoverLimiter(
        RedisLimiter(rl.backend, rl.timeout), rl.on_backend_error, rl.replicas, clock, metrics.ratelimit_degraded
    )


class Services:
    def __init__(self, config: GatewayConfig, store: KeyStore, clock: Clock, metrics: Metrics) -> None:
        keys = config.keys
        self.config = config
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.peppers = load_peppers(keys, config.store)
        self.cache = KeyCache(
            store,
            self.peppers,
            clock,
            metrics,
            ttl=keys.cache_ttl,
            negative_ttl=keys.negative_ttl,
            negative_size=keys.negative_cache_size,
            max_stale=keys.max_stale,
        )
        self.key_auth = KeyAuth(
            KeyFormat(keys.prefix),
            self.peppers,
            self.cache,
            clock,
            metrics,
            keys.headers,
            keys.query.names,
            keys.warn_before,
        )
        self.keys = KeyService(store, self.peppers, keys.prefix, clock, keys.default_ttl, self.cache)
        self.limiter = build_limiter(config, clock, metrics)
        self.throttle = AuthThrottle(config.auth, clock)
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, config: GatewayConfig, clock: Clock | None = None, metrics: Metrics | None = None
    ) -> Services:
        """Open the store (migrating it) and everything built on it."""
        store = open_store(config.store)
        services = cls(config, store, clock or Clock(), metrics or Metrics())
        await store.open()
        return services

    def start_background(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.keys.touch_interval)
            await self.flush_last_used()

    async def flush_last_used(self) -> None:
        """last_used_at without a store write per request: one batched write per interval."""
        pending = self.key_auth.last_used
        if not pending:
            return
        self.key_auth.last_used = {}
        batch = {k: datetime.fromtimestamp(t, UTC) for k, t in pending.items()}
        try:
            await self.store.touch(batch)
        except StoreUnavailable:
            for k, t in pending.items():  # keep them for the next try, newest wins
                self.key_auth.last_used[k] = max(t, self.key_auth.last_used.get(k, 0.0))

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        with contextlib.suppress(StoreUnavailable):
            await self.flush_last_used()
        await self.limiter.close()
        await self.store.close()
