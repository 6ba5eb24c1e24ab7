"""One measurement: wrk against a proxy while counting the proxy's CPU time from /proc."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import wrk
from bench.procs import CpuMeter, ForeignMeter, Proc, Procs

LATENCY = "latency"  # wrk -t1 -c1
THROUGHPUT = "throughput"  # wrk -t1 -c64
CONNECTIONS = {LATENCY: 1, THROUGHPUT: 64}


@dataclass
class Target:
    """A proxy under test: its name in the report, its process (tree) and its port."""

    name: str
    proc: Proc
    port: int


def measure(
    procs: Procs, target: Target, mode: str, *, path: str, duration: float, headers: dict[str, str],
    load_cpus: Sequence[int] | None, log: Path, helpers: Sequence[Proc] = (), script: Path | None = None,
    backends: Sequence[Proc] = (),
) -> dict[str, Any]:
    """`helpers` (the upstream...) are left out of the background-load figure along with the target.
    `backends` (a Redis the gateway's limiter uses) are helpers whose CPU is counted apart: work done
    for the gateway's requests outside its own processes."""
    target.proc.check_alive()
    foreign = ForeignMeter([target.proc.pid, *(h.pid for h in helpers)])
    meter = CpuMeter(target.proc.pid)
    backend_meters = [CpuMeter(b.pid) for b in backends]
    foreign.start()
    for m in backend_meters:
        m.start()
    meter.start()
    res = wrk.run(
        procs, f"http://127.0.0.1:{target.port}{path}", connections=CONNECTIONS[mode],
        duration=duration, headers=headers, cpus=load_cpus, log=log, script=script,
    )
    cpu_s, warnings = meter.stop()
    backend_s = 0.0
    for m in backend_meters:
        spent, also = m.stop()
        backend_s += spent
        warnings += also
    background = foreign.stop()
    target.proc.check_alive()
    return {
        "requests": res.requests,
        "seconds": res.seconds,
        "rps": res.rps,
        "read_mib_s": res.read_bytes / res.seconds / 2**20 if res.seconds else 0.0,
        "p50_us": res.latency_us.get("50"),
        "p99_us": res.latency_us.get("99"),
        "cpu_s": cpu_s,
        "cpu_us_per_req": cpu_s * 1e6 / res.requests if res.requests else None,
        "cpu_util": cpu_s / res.seconds if res.seconds else None,
        "backend_cpu_us_per_req": backend_s * 1e6 / res.requests if backend_meters and res.requests else None,
        "background_cpu": background / res.seconds if res.seconds else None,
        "non_2xx": res.non_2xx,
        "socket_errors": res.socket_errors,
        "errors": res.errors,
        "warnings": warnings,
        "wrk_output": res.output if res.errors or warnings else None,
    }
