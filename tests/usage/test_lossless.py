"""The issue's test: PostgreSQL stopped under load, SIGTERM, restart; nothing lost, nothing doubled.

Real processes and a real PostgreSQL: `gateway run` in a subprocess on a fresh schema, several
concurrent keep-alive clients, the throwaway PostgreSQL of scripts/test-services.sh stopped with
pg_ctl for a few seconds during the load. Every response a client received must have exactly one
row in usage_records, under the X-Request-ID the client got; no row may belong to anything else.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.upstream import RecordingUpstream
from tests.usage.support import (
    ADMIN_TOKEN,
    GatewayProcess,
    Postgres,
    config_data,
    pg_connect,
    wait_for,
)

CLIENTS = 8


@dataclass
class Load:
    """Clients sending until told to stop; every response they received, by request id."""

    url: str
    key: str
    pace: float
    received: dict[str, int] = field(default_factory=dict)  # X-Request-ID -> status
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def client(self, n: int) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            i = 0
            while not self.stop.is_set():
                i += 1
                # every tenth request comes without a key: a refusal is a served request too
                headers = {} if i % 10 == 0 else {"X-API-Key": self.key}
                try:
                    async with session.get(f"{self.url}/metered/{n}/{i}", headers=headers) as resp:
                        await resp.read()
                        rid = resp.headers.get("X-Request-ID", "")
                        assert rid and rid not in self.received, rid
                        self.received[rid] = resp.status
                        if resp.status not in (200, 401):
                            self.errors.append(f"{resp.status} {(await resp.read())[:200]!r}")
                except (aiohttp.ClientError, OSError) as e:
                    self.errors.append(repr(e))
                await asyncio.sleep(self.pace)

    async def until(self, n: int, gw: GatewayProcess, timeout: float = 30.0) -> None:
        try:
            await wait_for(lambda: len(self.received) >= n, timeout, 0.02, f"{n} responses")
        except AssertionError as e:
            statuses = Counter(self.received.values())
            raise AssertionError(f"{e}: {len(self.received)} received {dict(statuses)}, errors {self.errors[:5]}; "
                                 f"the gateway's log:\n{gw.stderr()[-3000:]}") from None


def gateway_config(store_url: str, upstream: str, spool: Path) -> dict[str, Any]:
    return config_data(
        store_url, upstream,
        routes=[{"name": "metered", "path": "/metered", "upstream": upstream}],
        usage={"flush_interval": "200ms", "write_timeout": "2s", "spool_dir": str(spool)},
        shutdown_timeout="10s",
    )


async def create_key(gw: GatewayProcess) -> str:
    async with aiohttp.ClientSession() as s, s.post(
        gw.admin_url + "/admin/keys", json={"owner": "load"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    ) as resp:
        assert resp.status == 201, await resp.text()
        return str((await resp.json())["key"])


async def start_gateway(tmp_path: Path, data: dict[str, Any]) -> GatewayProcess:
    gw = GatewayProcess(tmp_path, data, log_level="WARNING")
    await asyncio.to_thread(gw.wait_ready)
    return gw


async def stop_gateway(gw: GatewayProcess) -> None:
    """SIGTERM: the gateway drains, flushes its usage queue (store or spool) and exits 0."""
    code = await asyncio.to_thread(gw.stop_checked)  # checks first that it dropped no usage record
    assert code == 0, gw.stderr()[-3000:]


async def rows(store_url: str) -> tuple[int, dict[str, int]]:
    conn = await pg_connect(store_url)
    try:
        n = await conn.fetchval("SELECT count(*) FROM usage_records")
        statuses = {r["request_id"]: r["status"] for r in await conn.fetch(
            "SELECT request_id, status FROM usage_records")}
    finally:
        await conn.close()
    return int(n), statuses


async def replay_and_check(tmp_path: Path, data: dict[str, Any], store_url: str, spool: Path,
                           load: Load) -> None:
    """Start the gateway again for a moment (it replays the spool), stop it, compare the counts."""
    gw = await start_gateway(tmp_path, data)
    try:
        served = len(load.received)

        async def caught_up() -> bool:
            n, _ = await rows(store_url)
            return n >= served and not any(spool.glob("*.batch"))

        await wait_for(caught_up, 20, 0.1, "the replay of the spool")
    finally:
        await stop_gateway(gw)
    n, statuses = await rows(store_url)
    assert not load.errors, load.errors[:5]
    assert n == len(load.received), (n, len(load.received))
    assert statuses == load.received  # every id a client got, with its status, and nothing else
    assert not any(spool.glob("*.batch"))


@dataclass
class LoadRun:
    gw: GatewayProcess
    load: Load
    data: dict[str, Any]
    spool: Path
    clients: list[asyncio.Task[None]]

    async def stop_clients(self) -> None:
        """Every client finishes the request it is in, so none sees the gateway go away."""
        self.load.stop.set()
        await asyncio.gather(*self.clients)


@asynccontextmanager
async def under_load(store_url: str, upstream: RecordingUpstream, tmp_path: Path, pace: float) -> AsyncIterator[LoadRun]:
    """`gateway run` on the store with a disk spool, and CLIENTS clients sending through it until the
    block ends (or the test stops them sooner); the process is gone when the block is left."""
    spool = tmp_path / "spool"
    data = gateway_config(store_url, upstream.url, spool)
    gw = await start_gateway(tmp_path, data)
    try:
        load = Load(gw.url, await create_key(gw), pace=pace)
        run = LoadRun(gw, load, data, spool, [asyncio.create_task(load.client(n)) for n in range(CLIENTS)])
        try:
            yield run
        finally:
            await run.stop_clients()
    finally:
        await asyncio.to_thread(gw.stop)


@pytest.fixture
async def quiet_up() -> AsyncIterator[RecordingUpstream]:
    """An upstream that answers thousands of requests without keeping them."""
    upstream = await RecordingUpstream(keep_bodies=False).start()
    try:
        yield upstream
    finally:
        await upstream.close()


async def test_postgres_outage_under_load_then_sigterm_and_restart(
    pg_store_url: str, quiet_up: RecordingUpstream, tmp_path: Path
) -> None:
    pg = Postgres()
    async with under_load(pg_store_url, quiet_up, tmp_path, pace=0.015) as run:
        await run.load.until(500, run.gw)
        await pg.astop()
        try:
            t_down = time.monotonic()
            await run.load.until(1200, run.gw)
            await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - t_down)))  # down for 3 s at least
            spooled_during_outage = any(run.spool.glob("*.batch"))
        finally:
            await pg.astart()
        await run.load.until(2000, run.gw)
        await run.stop_clients()
        assert spooled_during_outage
        await stop_gateway(run.gw)
    await replay_and_check(tmp_path, run.data, pg_store_url, run.spool, run.load)


async def test_sigterm_while_postgres_is_down_spools_the_queue_for_the_next_start(
    pg_store_url: str, quiet_up: RecordingUpstream, tmp_path: Path
) -> None:
    pg = Postgres()
    async with under_load(pg_store_url, quiet_up, tmp_path, pace=0.01) as run:
        await run.load.until(300, run.gw)
        await pg.astop()
        try:
            await run.load.until(800, run.gw)
            await run.stop_clients()
            # SIGTERM with the store down: what is queued goes to the spool before the exit
            await stop_gateway(run.gw)
            spool = run.spool
            assert any(spool.glob("*.batch"))
            spooled = sum(len(p.read_text().splitlines()) for p in spool.glob("*.batch"))
            assert spooled > 0
            assert all(len(json.loads(line)) == 15 for p in spool.glob("*.batch") for line in p.read_text().splitlines())
        finally:
            await pg.astart()
    await replay_and_check(tmp_path, run.data, pg_store_url, run.spool, run.load)
