"""Microbenchmark: the Python cost of the whole data path, with the sockets taken away.

One tiny GET goes through the real `ClientConnection` and `UpstreamConnection` (llhttp on both
sides, routing, the route's stages, head building, metrics, the usage record) over transports that
only keep what is written. What `make bench` measures minus this is the kernel's share (the four
socket calls per request) and the event loop's. Scenarios as in `make bench`:

- `plain`: the `auth: none` route (proxying, header hygiene, request id, metrics, usage record);
- `keys`: a real key from the store (cached after the first request), scopes per method, three
  limits in the memory limiter, identity headers, usage record, metrics, anomaly detection.

    .venv/bin/python -m bench.path_micro [--requests N] [--rounds N] [--scenario NAME] [--profile]

Rounds alternate between the scenarios; the median is printed. `--profile` runs the last scenario
under cProfile once and prints the functions with the most own time. CPU time on this shared
machine drifts by 10-20 % between runs; for small changes count instructions instead, which
`valgrind --tool=callgrind` gives the same every run (the difference between two run lengths,
over the difference in requests, is the cost of one request).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from bench.scenarios import KEYED_ROUTE, PEPPER
from gateway.app import install_uvloop
from gateway.config.schema import GatewayConfig
from gateway.http.server import ClientConnection
from gateway.http.upstream import UpstreamConnection
from gateway.proxy import ProxyServer
from gateway.services import Services

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 10:29:48 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)


class Sink(asyncio.Transport):
    """A transport that keeps the bytes written to it (the last write only) and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.last = b""

    def write(self, data: Any) -> None:
        self.last = bytes(data)

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        self.write(b"".join(list_of_data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True


def config(tmp: str, keys: bool) -> GatewayConfig:
    os.makedirs(tmp, exist_ok=True)
    route: dict[str, Any] = {"name": "bench", "path": "/", "upstream": "http://127.0.0.1:9", "auth": "none"}
    if keys:
        route.update(KEYED_ROUTE)
    return GatewayConfig.model_validate(
        {"store": f"sqlite:///{tmp}/bench.db", "keys": {"pepper": PEPPER}, "routes": [route]}
    )


class Path:
    """One client connection and one pooled upstream connection, driven by hand."""

    def __init__(self, services: Services, server: ProxyServer, request: bytes) -> None:
        self.services = services
        self.server = server
        self.request = request
        self.client = ClientConnection(server)
        self.client_sink = Sink()
        self.client.connection_made(self.client_sink)
        route = server.router.routes[0]
        self.upstream = UpstreamConnection(server.pool, route.upstreams[0])
        self.upstream_sink = Sink()
        self.upstream.connection_made(self.upstream_sink)
        server.pool.release(self.upstream)

    def one(self) -> None:
        self.client.data_received(self.request)
        self.upstream.data_received(RESPONSE)

    async def close(self) -> None:
        await self.server.close()
        await self.services.close()

    def check(self) -> None:
        """The request went upstream and its answer came back: the benchmark measures real work."""
        self.one()
        sent, answer = self.upstream_sink.last, self.client_sink.last
        if not sent.startswith(b"GET / HTTP/1.1\r\n") or not answer.startswith(b"HTTP/1.1 200 OK\r\n"):
            raise RuntimeError(f"the request did not go through: sent {sent[:40]!r}, answered {answer[:200]!r}")


async def open_path(tmp: str, keys: bool) -> Path:
    cfg = config(tmp, keys)
    services = await Services.open(cfg)
    server = ProxyServer(cfg, asyncio.get_running_loop(), services)
    headers = b"Host: 127.0.0.1:8080\r\n"
    if keys:
        _, raw = await services.keys.create("bench", scopes=["bench:read"])
        headers += b"X-API-Key: " + raw.encode() + b"\r\n"
    path = Path(services, server, b"GET / HTTP/1.1\r\n" + headers + b"\r\n")
    path.client.data_received(path.request)  # the first request reads the key from the store
    for _ in range(500):
        if path.upstream_sink.last:
            break
        await asyncio.sleep(0.01)
    path.upstream.data_received(RESPONSE)
    path.check()
    return path


def run(path: Path, n: int) -> float:
    # The usage writer is not started here (its batches would be another process's work), so its
    # queue is emptied before each run: at its bound, every request would be answered 503 at once,
    # without authentication, limits or the upstream. Checked after each run.
    if path.services.usage is not None:
        path.services.usage.queue.clear()
    one = path.one
    start = time.process_time()
    for _ in range(n):
        one()
    spent = (time.process_time() - start) / n * 1e6
    path.check()
    return spent


async def measure(requests: int, rounds: int, profile: bool, names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        opened = {name: await open_path(f"{tmp}/{name}", name == "keys") for name in names}
        try:
            if profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.runcall(run, opened[names[-1]], requests)
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
                return
            results: dict[str, list[float]] = {name: [] for name in opened}
            for _ in range(rounds):
                for name, path in opened.items():
                    run(path, requests // 10)  # warm
                    results[name].append(run(path, requests))
                    await asyncio.sleep(0)  # let callbacks queued by the run go
            for name, values in results.items():
                print(
                    f"{name:<6} {statistics.median(values):6.2f} CPU-µs per request "
                    f"({min(values):.2f}-{max(values):.2f}, {rounds} rounds of {requests:,})"
                )
        finally:
            for path in opened.values():
                await path.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenario", action="append", choices=["plain", "keys"], help="repeatable; default both")
    parser.add_argument("--profile", action="store_true", help="cProfile the (last) scenario once instead")
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(measure(args.requests, args.rounds, args.profile, args.scenario or ["plain", "keys"]))


if __name__ == "__main__":
    main()
