"""The supervisor of `gateway run --workers N`: forks the limits process (ratelimit/host.py), then
the serving processes (each binds its own SO_REUSEPORT listener), serves the admin API with the
workers' metrics summed, reports ready once every worker listens, passes SIGHUP on to the workers,
and stops them all when told to or when one of them (or the limits process) fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.app import Gateway, StartupError, open_services, shown_address
from gateway.config.schema import GatewayConfig
from gateway.fleet_metrics import FleetCollector
from gateway.keys.peppers import PepperMissing, load_peppers
from gateway.ratelimit.host import serve_limits
from gateway.ratelimit.shared import WorkerLink
from gateway.reload import reloaded

log = logging.getLogger("gateway")


def supervise(config: GatewayConfig, workers: int, path: str | None = None) -> int:
    """Fork `workers` serving processes, serve the admin API here, stop them all on SIGTERM/SIGINT."""
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
        raise StartupError(f"cannot listen on {shown_address((host, port))}: {e.strerror or e}") from None
    children: list[int] = []
    limits = 0
    metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
    try:  # from here on, whatever fails stops what was forked and removes the folder
        ready_r, ready_w = os.pipe()
        # The limits process (ratelimit/host.py) holds the memory:// counters and the failed-auth count
        # for every worker; each worker asks it over a socket pair of its own (ratelimit/shared.py).
        pairs = [socket.socketpair() for _ in range(workers)]
        limits = _fork_limits(config, pairs, [probe.fileno(), ready_r, ready_w])
        for i in range(workers):
            pid = os.fork()
            if pid == 0:
                probe.close()
                os.close(ready_r)
                for j, (_, worker_end) in enumerate(pairs):
                    if j != i:
                        worker_end.close()
                _worker(config, path, ready_w, metrics_dir, WorkerLink(pairs[i][1], workers))
            children.append(pid)
        probe.close()
        os.close(ready_w)
        for _, worker_end in pairs:
            worker_end.close()
        return asyncio.run(_supervisor_loop(config, children, limits, ready_r, metrics_dir, path))
    except BaseException:
        _stop_workers([*children, *([limits] if limits else [])], config.shutdown_timeout + config.shutdown_delay + 5)
        raise
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _fork_limits(config: GatewayConfig, pairs: list[tuple[socket.socket, socket.socket]], close: list[int]) -> int:
    """Fork the limits process with the pairs' first ends; it closes the other ends and `close`.
    SIGINT and SIGTERM are blocked across the fork, so a Ctrl-C cannot end it before it ignores them."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            for fd in close:
                os.close(fd)
            for _, worker_end in pairs:
                worker_end.close()
            code = serve_limits(config, [host_end for host_end, _ in pairs])
        except BaseException:
            log.exception("the limits process failed")
        finally:
            sys.stderr.flush()
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, old)
    for host_end, _ in pairs:
        host_end.close()
    return pid


def _worker(config: GatewayConfig, path: str | None, ready_w: int, metrics_dir: Path, link: WorkerLink) -> None:
    """A forked worker's life; it never returns into the supervisor's code, whatever happens."""
    from gateway.ids import reseed

    reseed()
    worker = Gateway(config, admin=False)
    worker.config_path = path
    worker.ready_fd = ready_w
    worker.metrics_dir = metrics_dir
    worker.limiter_link = link
    code = 1
    try:
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


def _stop_workers(children: list[int], timeout: float) -> None:
    """The supervisor is failing: SIGTERM the processes still running (the limits process ignores it, and
    ends with the last worker), SIGKILL them after `timeout`."""
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


async def _supervisor_loop(
    config: GatewayConfig, children: list[int], limits: int, ready_fd: int, metrics_dir: Path, path: str | None
) -> int:
    gw = Gateway(config)
    gw.services = await open_services(config)
    # The admin API here authenticates keys too: it must hear of revocations made elsewhere.
    key_sync = asyncio.ensure_future(gw.services.key_changes.run())
    gw.metrics_registry = CollectorRegistry(auto_describe=False)
    gw.metrics_registry.register(FleetCollector(metrics_dir, live=gw.services.metrics.registry))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    def reload() -> None:
        # Checked here to say so once; each worker reads the file again itself.
        if path is not None and reloaded(path, config) is not None and not stopping.is_set():
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await gw.start_admin()
    # Held back since start-up (app.run); the workers unblock it themselves once they serve. A SIGHUP
    # that came meanwhile is passed on now, and each worker applies it when it is ready.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    alive = {*children, limits}

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
                        what = "the limits process" if pid == limits else f"worker {pid}"
                        log.error("%s exited (status %d); stopping", what, status)
                        stopping.set()
            await asyncio.sleep(0.1)

    reaper = asyncio.ensure_future(reap())
    await stopping.wait()
    readiness.cancel()
    gw.state.update(ready=False, reason="draining")
    for pid in alive:
        if pid != limits:  # it ignores SIGTERM, and exits once every worker has gone
            os.kill(pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(reaper, config.shutdown_timeout + config.shutdown_delay + 5)
    except TimeoutError:
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    key_sync.cancel()
    if gw.admin_runner is not None:
        await gw.admin_runner.cleanup()
    if gw.services is not None:
        await gw.services.close()
    return 1 if failed else 0
