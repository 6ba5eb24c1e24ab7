"""WebSocket upgrades pass through on routes with `websocket: true` and are refused elsewhere."""

from __future__ import annotations

import asyncio
import json
import os

import aiohttp
import pytest

from tests.e2e.servers import base_block
from tests.e2e.support import GatewayProcess, Launcher
from tests.helpers.gateway import read_response
from tests.helpers.upstream import RecordingUpstream

TIMEOUT = aiohttp.ClientTimeout(total=20)
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@pytest.fixture(scope="module")
def gw(module_launch: Launcher) -> GatewayProcess:
    up = module_launch.server()
    return module_launch.gateway(
        [
            {"name": "live", "path": "/live", "upstream": up.url, "auth": "none", "websocket": True},
            {"name": "plain", "path": "/plain", "upstream": up.url, "auth": "none"},
        ]
    )


async def test_websocket_session_passes_through(gw: GatewayProcess) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.ws_connect(gw.url + "/live/ws") as ws:
        for i in range(20):
            await ws.send_str(f"hello {i} ✓")
            assert await ws.receive_str(timeout=5) == f"hello {i} ✓"
            payload = os.urandom(100 + i * 997)
            await ws.send_bytes(payload)
            assert await ws.receive_bytes(timeout=5) == payload
        big = os.urandom(2 * 1024 * 1024)  # bigger than any buffer on the way
        await ws.send_bytes(big)
        assert await ws.receive_bytes(timeout=10) == big
        await ws.close()
        assert ws.close_code == 1000


async def test_upstream_close_after_a_large_message_reaches_the_client(gw: GatewayProcess) -> None:
    """The upstream sends 32 MiB and closes at once; a client slow to read still gets all of it."""
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.ws_connect(gw.url + "/live/ws", max_msg_size=0) as ws,
    ):
        await ws.send_str("send-and-close 5 32")
        await asyncio.sleep(1.0)  # the gateway holds what the client has not read yet
        assert await ws.receive_bytes(timeout=10) == base_block(5) * 32
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4000


async def test_many_sessions_at_once(gw: GatewayProcess) -> None:
    async def session(n: int) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.ws_connect(gw.url + "/live/ws") as ws:
            for i in range(10):
                await ws.send_str(f"{n}:{i}")
                assert await ws.receive_str(timeout=5) == f"{n}:{i}"

    await asyncio.gather(*(session(n) for n in range(20)))


async def test_http_still_works_on_a_websocket_route(gw: GatewayProcess) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.ws_connect(gw.url + "/live/ws") as ws:
            await ws.send_str("x")
            assert await ws.receive_str(timeout=5) == "x"
        async with s.get(gw.url + "/live/plain-get") as r:
            assert r.status == 200
            assert (await r.json())["path"] == "/live/plain-get"


async def test_upgrade_refused_on_a_route_without_websocket(gw: GatewayProcess) -> None:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(gw.url + "/plain/ws")
    assert exc.value.status == 400
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(UPGRADE.format(path="/plain/ws").encode())
        status, headers, body = await read_response(reader)
    finally:
        writer.close()
    assert status == 400
    assert headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "websocket_not_allowed"
    assert "upgrade" not in headers


async def test_refused_upgrade_never_reaches_the_upstream(launch: Launcher) -> None:
    up = await RecordingUpstream().start()
    try:
        gw = await asyncio.to_thread(
            launch.gateway, [{"name": "plain", "path": "/plain", "upstream": up.url, "auth": "none"}]
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(UPGRADE.format(path="/plain/ws").encode())
            status, _, body = await read_response(reader)
        finally:
            writer.close()
        assert status == 400 and json.loads(body)["code"] == "websocket_not_allowed"
        assert up.received == b"" and up.connections == 0
    finally:
        await up.close()


async def test_tunnel_delivers_everything_the_upstream_sent_before_closing(launch: Launcher) -> None:
    """An upstream that writes a lot after its 101 and closes at once: the client gets every byte."""
    size = 32 * 1024 * 1024
    payload = base_block(9) * (size // len(base_block(9)))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        )
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await asyncio.to_thread(
            launch.gateway,
            [{"name": "t", "path": "/t", "upstream": f"http://127.0.0.1:{port}", "auth": "none", "websocket": True}],
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(UPGRADE.format(path="/t/ws").encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            await asyncio.sleep(1.0)  # the upstream is done and gone; the gateway still holds bytes
            got = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        assert len(got) == size
        assert got == payload
    finally:
        server.close()


async def test_other_upgrades_are_served_as_plain_http(gw: GatewayProcess) -> None:
    """h2c (or any non-WebSocket protocol) is never tunnelled: the request is answered as HTTP/1.1."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(
            b"GET /live/h2c HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        status, headers, body = await read_response(reader)
    finally:
        writer.close()
    assert status == 200
    assert "upgrade" not in headers
    seen = {k.lower() for k, _ in json.loads(body)["headers"]}
    assert not seen & {"upgrade", "http2-settings", "connection"}
