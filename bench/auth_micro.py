"""Microbenchmark: CPU cost of authenticating a cached key (issue goal: ≤ 3 µs per request).

Runs the real route stages (authentication, IP allowlist, scopes) against a key already in the
verified-key cache, over a real SQLite store, and reports CPU-µs per call.

    .venv/bin/python -m bench.auth_micro
"""

from __future__ import annotations

import asyncio
import tempfile
import time

from bench.scenarios import PEPPER
from gateway.config.schema import GatewayConfig
from gateway.http.exchange import Exchange
from gateway.proxy import build_routes
from gateway.services import Services
from gateway.stages.auth import AuthStage
from gateway.stages.authorize import IPAllowStage, ScopeStage

N = 200_000


async def measure() -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        config = GatewayConfig.model_validate(
            {
                "store": f"sqlite:///{tmp}/bench.db",
                "keys": {"pepper": PEPPER},
                "routes": [
                    {"name": "r", "path": "/r", "upstream": "http://127.0.0.1:9", "scopes": {"GET": ["r:read"]}}
                ],
            }
        )
        services = await Services.open(config)
        try:
            _, raw = await services.keys.create("bench", scopes=["r:read"])
            route = build_routes(config, services)[0]
            auth = next(s for s in route.stages if isinstance(s, AuthStage))
            ipallow = next(s for s in route.stages if isinstance(s, IPAllowStage))
            scopes = next(s for s in route.stages if isinstance(s, ScopeStage))
            headers = [(b"host", b"x"), (b"user-agent", b"wrk"), (b"x-api-key", raw.encode())]

            def exchange() -> Exchange:
                ex = Exchange(0.0, 0.0)
                ex.method = "GET"
                ex.headers = headers
                ex.client_ip = "127.0.0.1"
                return ex

            pending = auth(exchange())  # first call fills the cache from the store
            if pending is not None:
                await pending
            results = {}
            for label, stages in (("authentication", [auth]), ("authentication+ip+scopes", [auth, ipallow, scopes])):
                base_start = time.process_time()
                for _ in range(N):
                    exchange()
                base = time.process_time() - base_start
                start = time.process_time()
                for _ in range(N):
                    ex = exchange()
                    for stage in stages:
                        if stage(ex) is not None:
                            raise RuntimeError("cached key took the slow path")
                elapsed = time.process_time() - start - base
                results[label] = elapsed / N * 1e6
            return results
        finally:
            await services.close()


def main() -> None:
    results = asyncio.run(measure())
    for label, us in results.items():
        print(f"{label:<28} {us:6.2f} CPU-µs per request (cached key)")


if __name__ == "__main__":
    main()
