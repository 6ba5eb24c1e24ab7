"""What is measured: each scenario is a request path, a process layout and edits to the gateway config.

To add one (real keys, limits, usage records, Redis...), append a `Scenario` to SCENARIOS; its
`configure` hook gets the generated gateway config (a dict, written out as gateway.yaml) and the
run's context (temp directory, the key table, the process list to start helpers such as Redis in).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.nginx import BIG_PATH
from bench.procs import Procs

KEY_COUNT = 1000


def key_table(count: int = KEY_COUNT, seed: int = 1000) -> list[str]:
    """The anchor's key map (and later the gateway's store): the same keys on every run."""
    rng = random.Random(seed)
    return [f"sk_bench{i:04d}_{rng.getrandbits(128):032x}" for i in range(count)]


@dataclass
class Setup:
    """What a scenario's `configure` hook may use and edit before the gateway starts."""

    workdir: Path
    config: dict[str, Any]
    keys: list[str]
    procs: Procs
    proxy_cpus: list[int] | None
    load_cpus: list[int] | None

    @property
    def route(self) -> dict[str, Any]:
        return self.config["routes"][0]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    path: str = "/"
    workers: int = 1  # gateway --workers; the nginx anchor gets as many worker_processes
    spread: bool = False  # proxies on every CPU instead of CPU 0 alone
    route: dict[str, Any] = field(default_factory=lambda: {"auth": "none"})  # merged into the route
    configure: Callable[[Setup], None] | None = None
    anchor: str = ""  # extra directives for the nginx anchor's proxying location
    note: str = ""


SCENARIOS: list[Scenario] = [
    Scenario(
        name="plain",
        description="tiny GET (2-byte body)",
    ),
    Scenario(
        name="stream_1mib",
        description="GET of a 1 MiB response, streamed",
        path=BIG_PATH,
        # nginx's defaults (8 x 4k buffers, spilling to temp files) cost it 4-5x the CPU per MiB;
        # unbuffered with 256k reads is its cheapest setting measured here, and it streams as we do.
        anchor="proxy_buffering off; proxy_buffer_size 256k; proxy_buffers 4 256k; proxy_busy_buffers_size 256k;",
        note="nginx anchor tuned for large responses: proxy_buffering off, proxy_buffer_size 256k",
    ),
    Scenario(
        name="workers2",
        description="tiny GET, two worker processes",
        workers=2,
        spread=True,
        note=(
            "proxies on both CPUs (gateway --workers 2, nginx worker_processes 2), sharing CPU 1 with "
            "wrk and the upstream: req/s is not a scaling figure; CPU/request is summed over all processes"
        ),
    ),
]

BY_NAME = {s.name: s for s in SCENARIOS}
