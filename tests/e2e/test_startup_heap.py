"""A serving process keeps what start-up made out of the garbage collector's walks.

A full collection walks every tracked object; the gateway's start-up heap (modules, config, routes,
the metrics registry) is tens of thousands of them, about 7 ms of walking, a loop stall of its own.
`Gateway.serve` freezes it once the listeners are up, and then counts every collection's pause for
Prometheus (gateway/heap.py). Run in a child process: freezing is for the
whole interpreter, and this test runner's heap must not be frozen.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers.net import free_port
from tests.helpers.processes import cli_env

CHILD = """
import asyncio, gc, sys
from gateway.app import Gateway
from gateway.config.schema import GatewayConfig

config = GatewayConfig.model_validate({
    "listen": "127.0.0.1:%(port)d",
    "admin": {"listen": "127.0.0.1:%(admin)d"},
    "store": "sqlite:///%(db)s",
    "routes": [{"name": "r", "path": "/", "upstream": "http://127.0.0.1:9", "auth": "none"}],
})

async def main():
    gw = Gateway(config)

    async def watch():
        for _ in range(2000):  # 10 s at most
            if gw.state["ready"] and gc.get_freeze_count():
                break
            await asyncio.sleep(0.005)
        print(gc.get_freeze_count(), len(gc.get_objects()))
        gc.collect()  # a full collection while serving: counted for Prometheus
        metric = gw.services.metrics.registry.get_sample_value
        print(metric("gateway_gc_freezes_total"), gw.heap.freezes, metric("gateway_gc_pause_seconds_count", {"generation": "2"}))
        gw.stopping.set()

    watcher = asyncio.get_running_loop().create_task(watch())
    code = await gw.serve()
    await watcher
    sys.exit(code)

asyncio.run(main())
"""


def test_serving_freezes_the_startup_heap(tmp_path: Path) -> None:
    script = CHILD % {"port": free_port(), "admin": free_port(), "db": tmp_path / "gateway.db"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=cli_env()
    )
    assert res.returncode == 0, res.stderr
    heap, metrics = res.stdout.splitlines()
    frozen, tracked = map(int, heap.split())
    assert frozen > 20_000  # what every full collection used to walk
    assert tracked < frozen // 20  # what it walks now, serving
    exported, freezes, full_collections = map(float, metrics.split())
    assert exported == freezes  # whether the small heap's collection was long enough depends on the machine
    assert full_collections >= 1
