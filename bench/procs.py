"""Child processes: start pinned in their own process group, wait for readiness, stop, count CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A failure the benchmark reports and stops on (after cleaning up)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """One started command in its own process group (signalled as a whole), output to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: Sequence[int] | None,
        log: Path,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        affinity = set(cpus) if cpus else None

        def pin() -> None:  # runs in the child between fork and exec: everything it starts inherits it
            if affinity:
                os.sched_setaffinity(0, affinity)

        self._logf = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            process_group=0,  # its own group: a terminal Ctrl-C reaches only the driver, which stops it
            preexec_fn=pin,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if not self.alive():
            raise BenchError(
                f"{self.name} exited with status {self.popen.returncode}; last output:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Signal the whole process group, wait, then SIGKILL whatever is left."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Workers may outlive a leader that died: the group is the unit.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._logf.close()


class Procs:
    """Everything started in one run; `stop_all` in a finally block stops it in reverse order."""

    def __init__(self) -> None:
        self.items: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], **kwargs: Any) -> Proc:
        proc = Proc(name, argv, **kwargs)
        self.items.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        while self.items:
            proc = self.items.pop()
            try:
                proc.stop()
            except Exception as e:  # keep stopping the rest
                print(f"bench: stopping {proc.name} failed: {e}")


def wait_port(proc: Proc, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"{proc.name}: nothing listens on port {port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def http_get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- CPU accounting from /proc ------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """The root and all its live descendants (by scanning the parent pid of every process)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    """utime+stime (fields 14, 15) plus cutime+cstime of reaped children (16, 17), in clock ticks."""
    out = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # After the name, field N of stat(5) is at index N - 3.
            out[pid] = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return out


class CpuMeter:
    """CPU seconds spent by a process tree between `start()` and `stop()`."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.before: dict[int, int] = {}

    def start(self) -> None:
        self.before = cpu_ticks(process_tree(self.root))

    def stop(self) -> tuple[float, list[str]]:
        pids = process_tree(self.root)
        after = cpu_ticks(pids)
        warnings = []
        gone = set(self.before) - set(after)
        if gone:
            # Reaped by a process of the tree, their whole lifetime's CPU lands in its parent's
            # cutime/cstime: counted, and then some (what they spent before the run too).
            warnings.append(f"processes {sorted(gone)} exited during the run: their CPU time may be over-counted")
        ticks = sum(after[p] - self.before.get(p, 0) for p in after)
        return ticks / CLK_TCK, warnings


def _busy_ticks() -> int:
    """All CPUs' non-idle time (user, nice, system, irq, softirq, steal) from /proc/stat, in ticks."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))


class ForeignMeter:
    """CPU time the machine spent on anything but the benchmark's own processes during a run.

    Busy time from /proc/stat minus the listed process trees, this driver and its reaped children
    (wrk). Interrupt time charged to no process shows up here too, so a quiet box reads a little
    above zero; a busy one (a test suite, a build) reads tenths of a CPU or more.
    """

    def __init__(self, roots: Sequence[int]) -> None:
        self.meters = [CpuMeter(r) for r in roots]
        self.busy = 0
        self.own = 0.0

    @staticmethod
    def _self() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        for m in self.meters:
            m.start()
        self.own = self._self()
        self.busy = _busy_ticks()

    def stop(self) -> float:
        busy = (_busy_ticks() - self.busy) / CLK_TCK
        own = self._self() - self.own + sum(m.stop()[0] for m in self.meters)
        return max(0.0, busy - own)
