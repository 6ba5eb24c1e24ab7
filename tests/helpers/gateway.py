"""Run the gateway's proxy listener inside the test's event loop, on a free loopback port."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from typing import Any

from aiohttp import web

from gateway.admin.app import build_admin_app
from gateway.clock import Clock
from gateway.config.schema import GatewayConfig
from gateway.keys.peppers import sqlite_path
from gateway.proxy import ProxyServer
from gateway.services import Services


def make_config(routes: list[dict[str, Any]], **top: Any) -> GatewayConfig:
    """A validated config listening on an ephemeral port; `top` sets any top-level field.

    Routes default to `auth: none` here: proxy-behaviour tests need no key store.
    """
    routes = [{"auth": "none", **r} for r in routes]
    data: dict[str, Any] = {"listen": "127.0.0.1:0", "routes": routes}
    data.update(top)
    return GatewayConfig.model_validate(data)


class RunningProxy:
    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy
        self.port = proxy.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw client connection, for framing tests."""
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def close(self) -> None:
        await self.proxy.close()


async def start_proxy(config: GatewayConfig) -> RunningProxy:
    proxy = ProxyServer(config, asyncio.get_running_loop())
    await proxy.start()
    return RunningProxy(proxy)


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length or chunked body (raw-socket tests)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout)).strip(), 16)
            data = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            if size == 0:
                break
            body += data[:-2]
    return status, headers, body


class RunningGateway(RunningProxy):
    """Proxy plus admin listener plus services (store, key cache), all in the test's loop."""

    def __init__(self, proxy: ProxyServer, services: Services, admin: web.AppRunner, admin_port: int) -> None:
        super().__init__(proxy)
        self.services = services
        self.admin = admin
        self.admin_port = admin_port
        self.temp_spool: str | None = None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def close(self) -> None:
        await self.proxy.close()
        await self.admin.cleanup()
        await self.services.close()
        if self.temp_spool is not None:
            shutil.rmtree(self.temp_spool, ignore_errors=True)


async def start_gateway(config: GatewayConfig, clock: Clock | None = None) -> RunningGateway:
    """Open the store named by `config.store` (migrating it) and serve proxy and admin on free ports."""
    spool = None
    if not config.usage.spool_dir and sqlite_path(config.store) is None:
        # The default spool of a non-file store is ./usage-spool: keep tests out of the working tree.
        spool = tempfile.mkdtemp(prefix="gateway-test-spool-")
        config = config.model_copy(update={"usage": config.usage.model_copy(update={"spool_dir": spool})})
    services = await Services.open(config, clock=clock)
    proxy = ProxyServer(config, asyncio.get_running_loop(), services)
    await proxy.start()
    runner = web.AppRunner(build_admin_app(config, {"ready": True, "reason": "ready"}, services), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    running = RunningGateway(proxy, services, runner, port)
    running.temp_spool = spool
    return running


def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    """A sample of the gateway's own registry (0 when it has none yet)."""
    value = gw.services.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)
