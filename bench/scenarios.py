"""What is measured: each scenario is a request path, a process layout and edits to the gateway config.

To add one (real keys, limits, usage records, Redis...), append a `Scenario` to SCENARIOS; its
`configure` hook gets the generated gateway config (a dict, written out as gateway.yaml) and the
run's context (temp directory, the key table, the process list to start helpers such as Redis in).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.nginx import BIG_PATH
from bench.procs import Proc, Procs

KEY_COUNT = 1000
# What the keyed scenarios add to the route (and bench/path_micro.py's `keys`): a scope per method and
# three limits no request reaches, so every request is checked and counted, none refused.
KEYED_ROUTE: dict[str, Any] = {
    "auth": "required",
    "scopes": {"GET": ["bench:read"]},
    "ratelimit": ["1000000/second", "100000000/hour", "1000000000/day"],
}
PEPPER = "bench-pepper"


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
    source: Path | None = None  # where the gateway package is imported from
    gateway_headers: dict[str, str] | None = None  # what wrk sends the gateway, when not the anchor's
    gateway_keys: list[str] | None = None  # with Scenario.rotate: the gateway's keys, in turn
    # Started for the run to serve the gateway (Redis): not background load, and their CPU is reported
    # beside the gateway's.
    helpers: list[Proc] = field(default_factory=list)

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
    key_count: int = KEY_COUNT  # keys in the anchor's map (and made in the gateway's store by `configure`)
    rotate: bool = False  # each request carries the next key (a wrk script), not the same one
    floor: bool = False  # also measure bench/floor_proxy.py: the least a Python proxy does per request


SCENARIOS: list[Scenario] = [
    Scenario(
        name="plain",
        description="tiny GET (2-byte body)",
        floor=True,
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

def real_keys(setup: Setup, backend: str = "memory://") -> None:
    """The full pipeline: a key created in the gateway's store (HMAC digest, verified-key cache),
    scopes per method, three limits that admit everything (so each request counts in all of them),
    the usage record and metrics (on by default)."""
    import subprocess
    import sys

    from bench.gateway import gateway_env, write_config

    setup.config["keys"] = {"pepper": PEPPER}
    setup.config["ratelimit"] = {"backend": backend}
    setup.config["auth"] = {"max_failures": 1000000}
    setup.route.update(KEYED_ROUTE)
    path = write_config(setup.workdir, setup.config)
    env = gateway_env(setup.source) if setup.source else None
    argv = [sys.executable, "-m", "gateway", "-c", str(path), "keys", "create", "--owner", "bench",
            "--scope", "bench:read", "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=setup.workdir, env=env, check=True)
    setup.gateway_headers = {"X-API-Key": json.loads(out.stdout)["key"]}


MAKE_KEYS = """
import asyncio, sys
from gateway.config.loader import load_config
from gateway.services import Services

async def main(config, count, out):
    services = await Services.open(load_config(config))
    try:
        keys = [(await services.keys.create("bench", scopes=["bench:read"]))[1] for _ in range(count)]
    finally:
        await services.close()
    with open(out, "w") as f:
        f.write("\\n".join(keys) + "\\n")

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def many_keys(setup: Setup, cache_ttl: str | None = None) -> None:
    """As real_keys, with as many keys in the store as the anchor's map holds, each request carrying
    the next: made in one process through the gateway's own key service (about 0.3 ms a key)."""
    import subprocess
    import sys
    import time

    from bench.gateway import gateway_env, write_config

    real_keys(setup)
    if cache_ttl is not None:
        setup.config["keys"]["cache_ttl"] = cache_ttl
    path = write_config(setup.workdir, setup.config)
    out = setup.workdir / "keys.txt"
    env = gateway_env(setup.source) if setup.source else None
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", MAKE_KEYS, str(path), str(len(setup.keys)), str(out)],
                   cwd=setup.workdir, env=env, check=True)
    setup.gateway_keys = out.read_text().split()
    print(f"  made {len(setup.gateway_keys):,} keys in the gateway's store in {time.monotonic() - started:.0f} s",
          flush=True)


def real_keys_redis(setup: Setup) -> None:
    """As real_keys, with the limits in a Redis started for the run (on the load CPUs)."""
    from bench.procs import free_port, wait_port

    port = free_port()
    redis = setup.procs.start(
        "redis",
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        cpus=setup.load_cpus,
        log=setup.workdir / "redis.log",
    )
    wait_port(redis, port)
    setup.helpers.append(redis)
    real_keys(setup, f"redis://127.0.0.1:{port}/0")


SCENARIOS += [
    Scenario(
        name="keys",
        description="tiny GET, full pipeline: hashed key from the store, scopes, 3 limits (memory), usage, metrics",
        configure=real_keys,
    ),
    Scenario(
        name="keys_redis",
        description="as keys, with the 3 limits in Redis (one Lua script per request, one pipeline per tick)",
        configure=real_keys_redis,
        note="Redis on the load CPUs, beside wrk and the upstream",
    ),
    Scenario(
        name="keys_workers2",
        description="as keys, two worker processes: the 3 limits (memory) held by the limits process, one frame per tick",
        configure=real_keys,
        workers=2,
        spread=True,
        note=(
            "as workers2: both CPUs, shared with wrk and the upstream; CPU/request is summed over the "
            "supervisor, the limits process (which decides the limits) and the workers"
        ),
    ),
]

SCENARIOS += [
    Scenario(
        name="keys_uncached",
        description="as keys, 1,000 keys in turn and keys.cache_ttl 0: every request reads its key from the store",
        configure=lambda setup: many_keys(setup, cache_ttl="0s"),
        rotate=True,
        note="the nginx anchor has its map in memory: there is no store to read",
    ),
    Scenario(
        name="keys_100k",
        description="as keys, 100,000 keys in the store and in the anchor's map, each request with the next",
        configure=many_keys,
        key_count=100_000,
        rotate=True,
        note=(
            "each key comes round every few seconds: the first pass and every expiry of a cached key "
            "(keys.cache_ttl, 30 s) read the store"
        ),
    ),
]

BY_NAME = {s.name: s for s in SCENARIOS}
