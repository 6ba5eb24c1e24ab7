"""Running the gateway: one serving process (proxy and admin listeners, signals, graceful drain); `run`
starts it, or the supervisor of several (`supervisor.py`)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.admin.app import build_admin_app
from gateway.config.schema import GatewayConfig
from gateway.fleet_metrics import write_snapshot
from gateway.heap import HeapKeeper, settle
from gateway.keys.peppers import PepperMissing
from gateway.proxy import ProxyServer
from gateway.ratelimit.shared import WorkerLink
from gateway.reload import reloaded
from gateway.services import Services
from gateway.store import StoreUnavailable

log = logging.getLogger("gateway")


def install_uvloop() -> bool:
    """Use uvloop when it is installed: it buys 7-14 % per request (PERFORMANCE.md)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


class Gateway:
    """One serving process: a proxy listener and, unless a supervisor serves it, the admin listener."""

    def __init__(self, config: GatewayConfig, *, admin: bool = True) -> None:
        self.config = config
        self.with_admin = admin
        self.state: dict[str, Any] = {"ready": False, "reason": "starting"}
        self.proxy: ProxyServer | None = None
        self.admin_runner: web.AppRunner | None = None
        self.services: Services | None = None
        self.stopping = asyncio.Event()
        self.ready_fd: int | None = None  # a worker writes a byte here once its listener is up
        self.metrics_dir: Path | None = None  # a worker's metrics go here for the supervisor to sum
        self.metrics_registry: CollectorRegistry | None = None  # what the admin /metrics serves
        self.limiter_link: WorkerLink | None = None  # a worker's way to the limits process
        self.config_path: str | None = None  # where SIGHUP reads the config again (gateway/reload.py)
        self._snapshots: asyncio.Task[None] | None = None
        self.heap = HeapKeeper()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.services = await open_services(self.config, self.limiter_link)
        self.services.start_background()
        self.proxy = ProxyServer(self.config, loop, self.services)
        try:
            await self.proxy.start()
        except OSError as e:
            raise StartupError(f"cannot start the proxy listener on {shown_address(self.config.listen)}: {e}") from None
        if self.metrics_dir is not None:
            self._snapshots = loop.create_task(self._snapshot_loop(self.metrics_dir))
        if self.with_admin:
            await self.start_admin()
        self.state.update(ready=True, reason="ready")

    async def start_admin(self) -> None:
        if self.services is None:
            self.services = await open_services(self.config)
        app = build_admin_app(self.config, self.state, self.services, self.metrics_registry)
        self.admin_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.admin_runner.setup()
        host, port = self.config.admin.listen
        site = web.TCPSite(self.admin_runner, host, port, reuse_port=True)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(f"cannot start the admin listener on {shown_address((host, port))}: {e}") from None

    async def stop(self) -> bool:
        """Readiness false, listeners closed, in-flight requests finished (up to shutdown_timeout)."""
        self.state.update(ready=False, reason="draining")
        if self.config.shutdown_delay:
            await asyncio.sleep(self.config.shutdown_delay)
        clean = True
        if self.proxy is not None:
            clean = await self.proxy.drain(self.config.shutdown_timeout)
            await self.proxy.close()
        if self._snapshots is not None and self.metrics_dir is not None and self.services is not None:
            self._snapshots.cancel()
            write_snapshot(self.metrics_dir, f"worker-{os.getpid()}", self.services.metrics.registry)
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        if self.services is not None:
            await self.services.close()
        return clean

    async def _snapshot_loop(self, folder: Path) -> None:
        assert self.services is not None
        while True:
            await asyncio.sleep(1.0)
            try:
                write_snapshot(folder, f"worker-{os.getpid()}", self.services.metrics.registry)
            except OSError:
                log.exception("could not write the metrics snapshot")

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # one held back since start-up comes now
        # What start-up made (modules, config, routes, the metrics registry, pools) lives as long as
        # the process: moved out of the collector's sight, a full collection walks only what serving
        # made since. Walking it took about 7 ms, a loop stall of its own. Done here, in each serving
        # process, because a worker opens its own services after the fork; what serving then keeps
        # (per-key state) is frozen as it grows (gateway/heap.py).
        settle()
        assert self.services is not None
        self.heap.start(loop, self.services.metrics.registry)
        try:
            if self.ready_fd is not None:  # the supervisor reports ready only when every worker listens
                os.write(self.ready_fd, b"1")
                os.close(self.ready_fd)
                self.ready_fd = None
            host, port = self.config.listen
            log.info("proxy listening on %s:%d", host, port)
            await self.stopping.wait()
            log.info("draining")
            clean = await self.stop()
        finally:
            self.heap.stop()
        if not clean:
            log.warning("shutdown_timeout passed with requests still in flight; they were cut")
        return 0


    def reload(self) -> None:
        """SIGHUP: the config file again, for what can change live (gateway/reload.py)."""
        if self.config_path is None or self.proxy is None:
            log.warning("SIGHUP ignored: no config file to read again")
            return
        new = reloaded(self.config_path, self.config)
        if new is None:
            return
        try:
            self.proxy.reload(new)
        except Exception:  # a route the schema accepted but that does not compile (a CA file gone, say)
            log.exception("reload of %s failed, still serving the previous config", self.config_path)
            return
        self.config = new
        log.info("reloaded %s: %d route%s", self.config_path, len(new.routes), "s" * (len(new.routes) != 1))


class StartupError(Exception):
    """The gateway cannot start: the message says why, for the operator."""


async def open_services(config: GatewayConfig, link: WorkerLink | None = None) -> Services:
    try:
        return await Services.open(config, link=link)
    except PepperMissing as e:
        raise StartupError(str(e)) from None
    except StoreUnavailable as e:
        raise StartupError(f"the key store at {_redact(config.store)} is unavailable: {e}") from None


def shown_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redact(url: str) -> str:
    """A store URL without its password, fit for a log line."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def run(config: GatewayConfig, workers: int = 1, path: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT (SIGHUP reads `path` again); with workers > 1, fork that many proxy
    processes (SO_REUSEPORT)."""
    install_uvloop()
    # SIGHUP reloads once serving (gateway/reload.py). Until then, here and in every child forked before
    # it serves, it is held back (blocked, not ignored): one sent during start-up is delivered then.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    # The SQLite store's thread (key lookups on a cache miss, reports) shares the GIL; with the default
    # 5 ms switch interval the event loop could wait that long behind it: request-latency p99 spikes.
    sys.setswitchinterval(0.001)
    if workers <= 1:
        gateway = Gateway(config)
        gateway.config_path = path
        return asyncio.run(gateway.serve())
    from gateway.supervisor import supervise  # it builds on this module's Gateway

    return supervise(config, workers, path)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
