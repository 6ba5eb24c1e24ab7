"""Running wrk and reading its report."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError, Procs

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_SIZE = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    read_bytes: float
    latency_us: dict[str, float] = field(default_factory=dict)  # "50", "75", "90", "99"
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    output: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if not path:
        raise BenchError("wrk not found (Debian: apt-get install wrk; `make bench` does it)")
    return path


def _duration_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse(output: str) -> WrkResult:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGT]?B) read", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not m or not rps:
        raise BenchError(f"cannot read wrk's report:\n{output}")
    result = WrkResult(
        requests=int(m.group(1)),
        seconds=_duration_us(m.group(2) + m.group(3)) / 1e6,
        rps=float(rps.group(1)),
        read_bytes=float(m.group(4)) * _SIZE[m.group(5)],
        output=output,
    )
    dist = output.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pct, value in re.findall(r"^\s+(\d+)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", dist[1], re.M):
            result.latency_us[pct] = _duration_us(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        result.non_2xx = int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        result.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
    return result


def run(
    procs: Procs, url: str, *, connections: int, duration: float, headers: dict[str, str],
    cpus: Sequence[int] | None, log: Path,
) -> WrkResult:
    """`wrk -t1 -cN -dS --latency` to completion (a started process, so an interrupt stops it too)."""
    argv = [wrk_binary(), "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "5s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    log.write_text("")
    proc = procs.start("wrk", argv, cpus=cpus, log=log)
    try:
        proc.popen.wait(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from None
    finally:
        procs.stop(proc)
    output = log.read_text(errors="replace")
    if proc.popen.returncode != 0:
        raise BenchError(f"wrk failed ({proc.popen.returncode}): {' '.join(argv)}\n{output}")
    return parse(output)
