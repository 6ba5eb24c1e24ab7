"""`kill -HUP` from outside: routes change without a restart, in one process and in every worker; a
file that does not load, or that changes what needs a restart, is refused and the gateway goes on."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import aiohttp
import pytest
import yaml

from tests.e2e.support import GatewayProcess, Launcher, Server, children, listeners

TIMEOUT = aiohttp.ClientTimeout(total=20)


def rewrite(gw: GatewayProcess, change: Any) -> None:
    """Edit the running gateway's config file in place."""
    doc = yaml.safe_load(gw.config_path.read_text())
    change(doc)
    gw.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))


async def served_by(gw: GatewayProcess, path: str, ups: list[Server], n: int = 8) -> list[int]:
    """Which of `ups` answered each of n requests (each on a connection of its own), by their logs."""
    before = [len(u.seen()) for u in ups]

    async def one() -> int:
        conn = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s, s.get(gw.url + path) as r:
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(n)))
    assert set(statuses) == {200}, statuses
    got = [len(u.seen()) - b for u, b in zip(ups, before, strict=True)]
    return got


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not within 10 s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("workers", [None, 2], ids=["single", "workers"])
async def test_sighup_changes_the_routes_live(launch: Launcher, workers: int | None) -> None:
    a, b = launch.server(), launch.server()
    gw = await asyncio.to_thread(
        launch.gateway, [{"name": "api", "path": "/api", "upstream": a.url, "auth": "none"}], workers=workers
    )
    assert await served_by(gw, "/api/x", [a, b]) == [8, 0]
    pids = listeners(children(gw.pid), gw.port) if workers else [gw.pid]

    def to_b(doc: dict[str, Any]) -> None:
        doc["routes"][0]["upstream"] = b.url
        doc["routes"].append({"name": "more", "path": "/more", "upstream": b.url, "auth": "none"})

    rewrite(gw, to_b)
    gw.proc.send_signal(signal.SIGHUP)

    async def moved() -> bool:
        return await served_by(gw, "/api/y", [a, b], n=16) == [0, 16]

    await until(moved)
    assert await served_by(gw, "/more/z", [a, b]) == [0, 8]
    assert gw.proc.poll() is None
    assert (listeners(children(gw.pid), gw.port) if workers else [gw.pid]) == pids  # nothing restarted


async def test_a_request_under_way_finishes_on_its_route(launch: Launcher) -> None:
    a, b = launch.server(), launch.server()
    gw = await asyncio.to_thread(
        launch.gateway, [{"name": "api", "path": "/api", "upstream": a.url, "auth": "none"}]
    )
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        slow = asyncio.ensure_future(s.get(gw.url + "/api/slow?delay=1"))
        await asyncio.sleep(0.3)
        rewrite(gw, lambda doc: doc["routes"][0].update(upstream=b.url))
        gw.proc.send_signal(signal.SIGHUP)
        r = await slow
        assert r.status == 200 and (await r.json())["slow"] is True
        r.release()
    assert [m for m, p in a.seen() if p.endswith("/slow?delay=1")] == ["GET"]
    await until(lambda: _eq(served_by(gw, "/api/x", [a, b]), [0, 8]))


async def _eq(got: Any, want: list[int]) -> bool:
    return bool(await got == want)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda doc: doc["routes"][0].update(path="no-slash"), "routes.0.path"),
        (lambda doc: doc.update(store="sqlite:///elsewhere.db"), "store cannot change without a restart"),
        (lambda doc: doc.update(listen="127.0.0.1:1"), "listen cannot change without a restart"),
    ],
    ids=["invalid", "store", "listen"],
)
async def test_a_refused_reload_keeps_the_running_config(launch: Launcher, change: Any, said: str) -> None:
    a, b = launch.server(), launch.server()
    gw = await asyncio.to_thread(
        launch.gateway, [{"name": "api", "path": "/api", "upstream": a.url, "auth": "none"}]
    )

    def both(doc: dict[str, Any]) -> None:
        doc["routes"][0]["upstream"] = b.url  # would be live, but the file as a whole is refused
        change(doc)

    rewrite(gw, both)
    gw.proc.send_signal(signal.SIGHUP)
    await until(lambda: _logged(gw, said))
    assert "reload of" in gw.log() and "refused" in gw.log()
    assert await served_by(gw, "/api/x", [a, b]) == [8, 0]
    assert gw.proc.poll() is None


async def _logged(gw: GatewayProcess, text: str) -> bool:
    return text in gw.log()
