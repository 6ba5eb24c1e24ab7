"""Running the gateway: the proxy and admin listeners, signals, graceful drain, worker processes."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.admin.app import build_admin_app
from gateway.config.schema import GatewayConfig
from gateway.fleet_metrics import FleetCollector, write_snapshot
from gateway.heap import HeapKeeper, settle
from gateway.keys.peppers import PepperMissing, load_peppers
from gateway.proxy import ProxyServer
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
        self._snapshots: asyncio.Task[None] | None = None
        self.heap = HeapKeeper()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.services = await open_services(self.config)
        self.services.start_background()
        self.proxy = ProxyServer(self.config, loop, self.services)
        try:
            await self.proxy.start()
        except OSError as e:
            raise StartupError(f"cannot start the proxy listener on {_shown(self.config.listen)}: {e}") from None
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
            raise StartupError(f"cannot start the admin listener on {_shown((host, port))}: {e}") from None

    async def stop(self) -> bool:
        """Readiness false, listeners closed, in-flight requests finished (up to shutdown_timeout)."""
        self.state.update(ready=False, reason="draining")
        if self.config.shutdown_delay:
            await asyncio.sleep(self.config.shutdown_delay)
        self.heap.stop()
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
        await self.start()
        # What start-up made (modules, config, routes, the metrics registry, pools) lives as long as
        # the process: moved out of the collector's sight, a full collection walks only what serving
        # made since. Walking it took about 7 ms, a loop stall of its own. Done here, in each serving
        # process, because a worker opens its own services after the fork; what serving then keeps
        # (per-key state) is frozen as it grows (gateway/heap.py).
        settle()
        self.heap.start(loop)
        if self.ready_fd is not None:  # the supervisor reports ready only when every worker listens
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)
            self.ready_fd = None
        host, port = self.config.listen
        log.info("proxy listening on %s:%d", host, port)
        await self.stopping.wait()
        log.info("draining")
        clean = await self.stop()
        if not clean:
            log.warning("shutdown_timeout passed with requests still in flight; they were cut")
        return 0


class StartupError(Exception):
    """The gateway cannot start: the message says why, for the operator."""


async def open_services(config: GatewayConfig) -> Services:
    try:
        return await Services.open(config)
    except PepperMissing as e:
        raise StartupError(str(e)) from None
    except StoreUnavailable as e:
        raise StartupError(f"the key store at {_redact(config.store)} is unavailable: {e}") from None


def _shown(address: tuple[str, int]) -> str:
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


def run(config: GatewayConfig, workers: int = 1) -> int:
    """Serve until SIGTERM/SIGINT; with workers > 1, fork that many proxy processes (SO_REUSEPORT)."""
    install_uvloop()
    # The SQLite store's thread (key lookups on a cache miss, reports) shares the GIL; with the default
    # 5 ms switch interval the event loop could wait that long behind it: request-latency p99 spikes.
    sys.setswitchinterval(0.001)
    if workers <= 1:
        return asyncio.run(Gateway(config).serve())
    return _supervise(config, workers)


def _supervise(config: GatewayConfig, workers: int) -> int:
    # A fresh SQLite store's generated pepper is made once, here: workers racing to create it would crash.
    try:
        load_peppers(config.keys, config.store)
    except PepperMissing as e:
        raise StartupError(str(e)) from None
    # Bind once here so a bad address fails before any fork; the workers bind their own SO_REUSEPORT sockets.
    host, port = config.listen
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        probe.bind((host, port))
    except OSError as e:
        probe.close()
        raise StartupError(f"cannot listen on {_shown((host, port))}: {e.strerror or e}") from None
    children: list[int] = []
    metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    ready_r, ready_w = os.pipe()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            probe.close()
            os.close(ready_r)
            from gateway.ids import reseed

            reseed()
            worker = Gateway(config, admin=False)
            worker.ready_fd = ready_w
            worker.metrics_dir = metrics_dir
            code = 1
            try:  # never return into the supervisor's code: a worker ends here, whatever happens
                code = asyncio.run(worker.serve())
            except StartupError as e:
                print(f"gateway: worker {os.getpid()}: {e}", file=sys.stderr)
            except KeyboardInterrupt:
                code = 130
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    probe.close()
    os.close(ready_w)
    try:
        return asyncio.run(_supervisor_loop(config, children, ready_r, metrics_dir))
    except BaseException:
        _stop_workers(children, config.shutdown_timeout + config.shutdown_delay + 5)
        raise
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _stop_workers(children: list[int], timeout: float) -> None:
    """The supervisor is failing: SIGTERM the workers still running, SIGKILL them after `timeout`."""
    import time

    alive = []
    for pid in children:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGTERM)
                alive.append(pid)
        except ChildProcessError:
            pass
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if os.waitpid(pid, os.WNOHANG)[0] == 0]
        time.sleep(0.05)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


async def _workers_listening(fd: int, workers: int) -> bool:
    """Wait for a byte from every worker; False when the pipe closes first (a worker died)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    done: asyncio.Future[bool] = loop.create_future()
    got = 0

    def readable() -> None:
        nonlocal got
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        got += len(data)
        if (not data or got >= workers) and not done.done():
            done.set_result(got >= workers)

    loop.add_reader(fd, readable)
    try:
        return await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _supervisor_loop(config: GatewayConfig, children: list[int], ready_fd: int, metrics_dir: Path) -> int:
    gw = Gateway(config)
    gw.services = await open_services(config)
    gw.metrics_registry = CollectorRegistry(auto_describe=False)
    gw.metrics_registry.register(FleetCollector(metrics_dir, live=gw.services.metrics.registry))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await gw.start_admin()
    alive = set(children)

    async def until_listening() -> None:
        if await _workers_listening(ready_fd, len(children)) and not stopping.is_set():
            gw.state.update(ready=True, reason="ready")

    readiness = asyncio.ensure_future(until_listening())

    failed = False  # a worker ended on its own: the exit code says so

    async def reap() -> None:
        nonlocal failed
        while alive:
            for pid in list(alive):
                done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG never blocks
                if done:
                    alive.discard(pid)
                    if not stopping.is_set():
                        failed = True
                        log.error("worker %d exited (status %d); stopping", pid, status)
                        stopping.set()
            await asyncio.sleep(0.1)

    reaper = asyncio.ensure_future(reap())
    await stopping.wait()
    readiness.cancel()
    gw.state.update(ready=False, reason="draining")
    for pid in alive:
        os.kill(pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(reaper, config.shutdown_timeout + config.shutdown_delay + 5)
    except TimeoutError:
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    if gw.admin_runner is not None:
        await gw.admin_runner.cleanup()
    if gw.services is not None:
        await gw.services.close()
    return 1 if failed else 0


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
