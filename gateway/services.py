"""What the pipeline's stages share in one process: store, peppers, key cache, metrics, clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import Counter

from gateway.anomalies import Anomaly, AnomalyDetector, Detector
from gateway.clock import Clock
from gateway.config.schema import GatewayConfig
from gateway.keys.cache import KeyCache
from gateway.keys.changes import KeyChanges
from gateway.keys.format import KeyFormat
from gateway.keys.inputs import KeyNotFound
from gateway.keys.model import AuditEntry
from gateway.keys.peppers import load_peppers, sqlite_path
from gateway.keys.service import KeyService
from gateway.metrics import Metrics
from gateway.ratelimit.base import Limiter
from gateway.ratelimit.failover import FailoverLimiter
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.shared import DroppedObservations, RemoteDetector, SharedLimiter, WorkerLink
from gateway.stages.auth import KeyAuth
from gateway.stages.throttle import AuthThrottle
from gateway.store import KeyStore, StoreUnavailable, open_store
from gateway.store.base import UsageStore
from gateway.tasks import Tasks
from gateway.telemetry import AccessLog, RequestMetrics
from gateway.usage.spool import Spool
from gateway.usage.writer import UsageWriter

log = logging.getLogger("gateway")
TOUCH_CHUNK = 500  # keys per last-used write


def build_limiter(
    config: GatewayConfig, clock: Clock, metrics: Metrics, shared: SharedLimiter | None = None, workers: int = 1
) -> Limiter:
    """memory:// (embedded; a worker's is the limits process's, reached through `shared`) or redis://, each
    shared one behind the configured failure policy."""
    rl = config.ratelimit
    if rl.backend.startswith("memory"):
        if shared is None:
            return MemoryLimiter(clock)
        return FailoverLimiter(shared, rl.on_backend_error, workers, clock, metrics.ratelimit_degraded)
    from gateway.ratelimit.redis import RedisLimiter

    return FailoverLimiter(
        RedisLimiter(rl.backend, rl.timeout), rl.on_backend_error, rl.replicas, clock, metrics.ratelimit_degraded
    )


def spool_dir(config: GatewayConfig) -> Path:
    """The configured spool folder; by default beside the SQLite database, else ./usage-spool."""
    if config.usage.spool_dir:
        return Path(config.usage.spool_dir)
    db = sqlite_path(config.store)
    return db.with_name(db.name + ".usage-spool") if db is not None else Path("usage-spool")


class Services:
    def __init__(
        self, config: GatewayConfig, store: KeyStore, clock: Clock, metrics: Metrics, link: WorkerLink | None = None
    ) -> None:
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
        # A poll every sync_interval: two of them leave room for a poll that began just before the write
        # and for a busy event loop.
        propagation = 2 * keys.sync_interval
        self.keys = KeyService(store, self.peppers, keys.prefix, clock, keys.default_ttl, self.cache, propagation)
        # Under --workers N, the failed-auth count (and memory:// limits) live in the limits process.
        self.shared = shared = SharedLimiter(link.sock, config.ratelimit.timeout) if link is not None else None
        workers = link.workers if link is not None else 1
        self.limiter = build_limiter(config, clock, metrics, shared, workers)
        self.throttle = AuthThrottle(config.auth, clock, shared.report_failure if shared is not None else None)
        if shared is not None:
            shared.on_block = self.throttle.block
        self.request_metrics = RequestMetrics(config.metrics.per_key_top)
        metrics.registry.register(self.request_metrics)
        u = config.usage
        self.usage: UsageWriter | None = None
        if u.enabled and isinstance(store, UsageStore):
            self.usage = UsageWriter(
                store,
                Spool(spool_dir(config), u.spool_max_bytes),
                metrics,
                policy=u.on_spool_full,
                batch_size=u.batch_size,
                interval=u.flush_interval,
                queue_max=u.queue_max,
                write_timeout=u.write_timeout,
            )
        self.access_log = AccessLog(u.access_log) if u.access_log else None
        self._rollups: asyncio.Task[None] | None = None
        self.tasks = Tasks()
        self.anomalies: Detector | None = None
        if config.anomalies.enabled:
            if shared is not None:  # --workers N: one detector, in the limits process, sees every worker
                self.anomalies = RemoteDetector(shared)
                shared.on_anomaly = self.on_anomaly
                metrics.registry.register(DroppedObservations(shared))
            else:
                self.anomalies = AnomalyDetector(config.anomalies, clock, self.on_anomaly)
            self.anomaly_events = Counter(
                "gateway_anomalies_total", "Anomalies detected", ["kind"], registry=metrics.registry
            )
        self._flusher: asyncio.Task[None] | None = None
        self.key_changes = KeyChanges(store, self.cache, clock, metrics, keys.sync_interval)
        self._key_sync: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        config: GatewayConfig,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        link: WorkerLink | None = None,
    ) -> Services:
        """Open the store (migrating it) and everything built on it."""
        store = open_store(config.store)
        services = cls(config, store, clock or Clock(), metrics or Metrics(), link)
        await store.open()
        if services.shared is not None:
            await services.shared.connect()
        return services

    def start_background(self) -> None:
        loop = asyncio.get_running_loop()
        self._flusher = loop.create_task(self._flush_loop())
        self._key_sync = loop.create_task(self.key_changes.run())
        if self.usage is not None:
            self.usage.start()
            self._rollups = loop.create_task(self._rollup_loop())

    async def _rollup_loop(self) -> None:
        store = self.store
        assert isinstance(store, UsageStore)
        while True:
            try:
                await store.rollup_usage(self.clock.now(), self.config.usage.retention)
            except StoreUnavailable:
                log.warning("usage rollup skipped: store unavailable")
            await asyncio.sleep(self.config.usage.rollup_interval)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.keys.touch_interval)
            await self.flush_last_used()

    async def flush_last_used(self) -> None:
        """last_used_at without a store write per request: batched writes once per interval, of
        TOUCH_CHUNK keys each. With 100,000 keys in use, one batch held the event loop (building it)
        and then the GIL (SQLite's thread) for tenths of a second (bench `keys_100k`)."""
        pending = self.key_auth.last_used
        if not pending:
            return
        self.key_auth.last_used = {}
        items = list(pending.items())
        for start in range(0, len(items), TOUCH_CHUNK):
            batch = {k: datetime.fromtimestamp(t, UTC) for k, t in items[start : start + TOUCH_CHUNK]}
            try:
                await self.store.touch(batch)
            except StoreUnavailable:
                for k, t in items[start:]:  # keep them for the next try, newest wins
                    self.key_auth.last_used[k] = max(t, self.key_auth.last_used.get(k, 0.0))
                return

    def on_anomaly(self, event: Anomaly) -> None:
        """Count, log and audit an anomaly; suspend the key when its kind's action says so."""
        self.anomaly_events.labels(event.kind).inc()
        log.warning("anomaly %s on %s: %s", event.kind, event.subject, event.detail)
        self.tasks.spawn(self._record_anomaly(event))

    async def _record_anomaly(self, event: Anomaly) -> None:
        change: dict[str, object] = {"kind": event.kind, "subject": event.subject, **event.detail,
                                     "action": event.action}
        source = event.subject if event.kind == "auth_failures_ip" else ""
        entry = AuditEntry("anomaly", "detector", source, event.key_id, change, at=self.clock.now())
        try:
            await self.store.add_audit(entry)
            if event.action == "suspend" and event.key_id is not None:
                await self.keys.suspend(event.key_id, reason=f"anomaly: {event.kind}", actor="detector")
        except StoreUnavailable:
            log.error("anomaly %s on %s could not be recorded: store unavailable", event.kind, event.subject)
        except KeyNotFound:
            log.error("anomaly %s: key %s no longer exists, nothing to suspend", event.kind, event.key_id)

    async def close(self) -> None:
        for task in (self._flusher, self._rollups, self._key_sync):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # a background task that failed must not fail the shutdown's flush
                    log.exception("a background task had failed")
        if self.usage is not None:
            await self.usage.close()
        await self.tasks.cancel_all()
        if self.access_log is not None:
            self.access_log.close()
        with contextlib.suppress(StoreUnavailable):
            await self.flush_last_used()
        await self.limiter.close()
        await self.store.close()
