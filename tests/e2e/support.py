"""Running the gateway and the test upstreams as processes, and watching them from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.net import free_port
from tests.helpers.processes import http_get, stop_process, wait_ready

SERVERS = Path(__file__).with_name("servers.py")
START_TIMEOUT = 30.0


def rss_bytes(pid: int) -> int:
    """The resident set size of a process, from /proc/PID/status (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def children(pid: int) -> list[int]:
    """The direct children of a process, like `pgrep -P PID` (read from /proc: procps may be missing)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "PID (COMM) ": state, ppid, …
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def socket_owners(pids: list[int], local_ports: set[int]) -> dict[int, int]:
    """Which of `pids` holds the IPv4 TCP socket with each local port (from /proc/net/tcp and fd links)."""
    inodes: dict[str, int] = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            port = int(parts[1].rsplit(":", 1)[1], 16)
            if port in local_ports and parts[9] != "0":
                inodes[f"socket:[{parts[9]}]"] = port
    owners: dict[int, int] = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in inodes:
                owners[inodes[link]] = pid
    return owners


def listeners(pids: list[int], port: int) -> list[int]:
    """Those of `pids` holding a listening IPv4 TCP socket on `port`: the workers of `--workers N`,
    not the limits process beside them."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{parts[9]}]")
    found = []
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


class RssSampler:
    """Samples a process's RSS every few milliseconds in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid = pid
        self.every = every
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.samples += 1
            except (OSError, RuntimeError):
                return
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _PlainDumper(yaml.SafeDumper):
    """Writes a shared object out again instead of as an anchor and alias (the gateway refuses those)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class Server:
    """servers.py in its own process."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.log_path = workdir / f"upstream-{free_port()}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(SERVERS), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"upstream did not start: {self.log_path.read_text(errors='replace')[-2000:]}")
        self.port = int(line.split()[1])
        self.pid = self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def seen(self) -> list[list[str]]:
        """[method, path] of every request this upstream has received."""
        status, body = http_get(self.url + "/__seen")
        assert status == 200
        doc: list[list[str]] = json.loads(body)
        return doc

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class GatewayProcess:
    """`python -m gateway run -c FILE` with its listeners on free loopback ports."""

    def __init__(
        self,
        workdir: Path,
        routes: list[dict[str, Any]],
        *,
        workers: int | None = None,
        wait: bool = True,
        **top: Any,
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        admin = {"listen": f"127.0.0.1:{self.admin_port}", **top.pop("admin", {})}
        config: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "admin": admin,
            "store": f"sqlite:///{workdir / 'gateway.db'}",
            "routes": routes,
            **top,
        }
        self.config_path = workdir / f"gateway-{self.port}.yaml"
        self.config_path.write_text(yaml.dump(config, Dumper=_PlainDumper, sort_keys=False))
        self.log_path = workdir / f"gateway-{self.port}.log"
        argv = [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path), "--log-level", "WARNING"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        with self.log_path.open("wb") as log:
            # its own process group: workers are stopped with it even if the supervisor dies first
            self.proc = subprocess.Popen(
                argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        self.pid = self.proc.pid
        if wait:
            self.wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        wait_ready(self.proc, self.admin_url, self.log, timeout)

    def readyz(self) -> int:
        return http_get(self.admin_url + "/readyz", timeout=2)[0]

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        return stop_process(self.proc, sig, timeout)


class Launcher:
    """Starts gateways and upstreams in one directory and stops every one of them at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.gateways: list[GatewayProcess] = []
        self.servers: list[Server] = []

    def gateway(self, routes: list[dict[str, Any]], *, wait: bool = True, **kwargs: Any) -> GatewayProcess:
        gw = GatewayProcess(self.workdir, routes, wait=False, **kwargs)
        self.gateways.append(gw)  # registered before waiting, so a failed start is still stopped
        if wait:
            gw.wait_ready()
        return gw

    def server(self, *args: str) -> Server:
        srv = Server(self.workdir, *args)
        self.servers.append(srv)
        return srv

    def close(self) -> None:
        for gw in self.gateways:
            gw.stop(timeout=10)
            try:  # the supervisor stops its workers itself; this is the backstop
                os.killpg(gw.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for srv in self.servers:
            srv.stop()


def problem(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    return doc
