"""Microbenchmark: the after-response work per request (issue goal: usage record + metrics ≤ 5 CPU-µs),
and the longest event-loop stall while batches are written (goal: none over 5 ms).

Runs the real Telemetry observer (request metrics, usage record onto the writer's queue, anomaly
detector) over a real SQLite store, then a loop-lag probe while 400,000 queued records are flushed,
and again while records arrive at full load for 10 s. The SQLite store writes them from its usage
writer process (gateway/store/sqlite_usage_process.py).

    .venv/bin/python -m bench.usage_micro [--baseline]

--baseline discards the batches instead of storing them: the stalls this machine has anyway.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tempfile
import time
from collections.abc import Callable

from bench.scenarios import PEPPER
from gateway.app import install_uvloop
from gateway.config.schema import GatewayConfig
from gateway.http.exchange import Exchange
from gateway.proxy import build_routes
from gateway.services import Services
from gateway.stages.auth import AuthStage
from gateway.telemetry import Telemetry

N = 200_000


async def measure() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = GatewayConfig.model_validate(
            {
                "store": f"sqlite:///{tmp}/bench.db",
                "keys": {"pepper": PEPPER},
                "routes": [{"name": "r", "path": "/r", "upstream": "http://127.0.0.1:9"}],
            }
        )
        services = await Services.open(config)
        services.start_background()
        try:
            _, raw = await services.keys.create("bench")
            route = build_routes(config, services)[0]
            ex0 = Exchange(0.0, 0.0)
            ex0.headers = [(b"x-api-key", raw.encode())]
            ex0.client_ip = "127.0.0.1"
            auth = next(s for s in route.stages if isinstance(s, AuthStage))
            pending = auth(ex0)
            if pending is not None:
                await pending
            principal = ex0.principal
            loop = asyncio.get_running_loop()
            results: dict[str, float] = {}
            for label, anomalies in (("metrics+usage", None), ("metrics+usage+anomalies", services.anomalies)):
                assert services.usage is not None
                observe = Telemetry(
                    services.clock, services.request_metrics, services.usage, None, anomalies
                )
                exchanges = []
                for i in range(N):
                    ex = exchanges_template(route, principal, loop.time())
                    ex.request_id = f"01900000-0000-7000-8000-{i:012d}{label[-1]}"[:36]
                    exchanges.append(ex)
                start = time.process_time()
                for ex in exchanges:
                    observe(ex)
                results[label] = (time.process_time() - start) / N * 1e6
            # Loop stalls while the writer drains what was queued. The 400,000 exchanges built above
            # are the benchmark's, not the gateway's: frozen, so the cyclic GC does not rescan them.
            del exchanges
            gc.collect()
            gc.freeze()
            drain = await _lags(lambda: bool(services.usage.queue))
            results["drain: loop stall p99 ms"] = drain[int(len(drain) * 0.99)] * 1000
            results["drain: longest stall ms"] = drain[-1] * 1000
            # Full load: records arrive at RATE per second, as the proxy's responses end, for 10 s.
            writer = services.usage
            template = exchanges_template(route, principal, loop.time())
            observe = Telemetry(services.clock, services.request_metrics, writer, None, services.anomalies)
            stop = time.monotonic() + 10
            sent = 0

            async def produce() -> None:
                nonlocal sent
                while time.monotonic() < stop:
                    for _ in range(RATE // 1000):
                        template.request_id = f"01900000-0000-7000-9000-{sent:012d}"
                        observe(template)
                        sent += 1
                    await asyncio.sleep(0.001)

            producer = asyncio.ensure_future(produce())
            steady = await _lags(lambda: not producer.done())
            results["full load: loop stall p99 ms"] = steady[int(len(steady) * 0.99)] * 1000
            results["full load: longest stall ms"] = steady[-1] * 1000
            results["full load: stalls over 5 ms"] = sum(1 for lag in steady if lag > 0.005)
            results["full load: records per second"] = sent / 10
            return results
        finally:
            await services.close()


RATE = 20_000  # records per second: above what one process serves (bench/README.md)


async def _lags(running: Callable[[], bool]) -> list[float]:
    """How late 1 ms sleeps wake while `running()`; sorted."""
    lags: list[float] = []
    deadline = time.monotonic() + 30
    while (running() or not lags) and time.monotonic() < deadline:
        t0 = time.perf_counter()  # uvloop's own clock moves in whole milliseconds
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t0 - 0.001)
    lags.sort()
    return lags


def exchanges_template(route: object, principal: object, now: float) -> Exchange:
    ex = Exchange(now, time.perf_counter())
    ex.method = "GET"
    ex.route = route  # type: ignore[assignment]
    ex.status = ex.upstream_status = 200
    ex.principal = principal  # type: ignore[assignment]
    ex.client_ip = "127.0.0.1"
    ex.upstream_started = ex.began
    return ex


def main() -> None:
    if "--baseline" in sys.argv[1:]:
        from gateway.store.sqlite_usage import SQLiteUsage

        async def discard(self: object, records: object) -> None:
            return None

        SQLiteUsage.write_usage = discard  # type: ignore[method-assign,assignment]
    sys.setswitchinterval(0.001)  # as `gateway run` sets it
    install_uvloop()
    for label, value in asyncio.run(measure()).items():
        unit = "" if "ms" in label or "second" in label else " CPU-µs per request"
        print(f"{label:<28} {value:8.2f}{unit}")


if __name__ == "__main__":
    main()
