"""The end of a tunnel (WebSocket after 101) that the upstream closes.

A client slower than its upstream leaves bytes in the gateway's send buffer when the upstream's end
arrives. To hold that state for certain rather than by timing, the tests raise the client
connection's write-buffer limits, so the gateway reads the upstream to its end without pausing
while the client reads nothing; the kernel takes a few MiB and the gateway keeps the rest.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers.polling import wait_for

from .wire import ScriptedUpstream, read_head, route

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
PAYLOAD = os.urandom(16 * 1024 * 1024)  # more than the kernel buffers of a loopback connection


async def _tunnel(
    gateway: Any, upstreams: list[ScriptedUpstream], abort: bool, idle_timeout: str = "30s"
) -> tuple[Any, asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a tunnel whose upstream sends PAYLOAD and then closes (or resets) while the client reads
    nothing; return once the gateway has seen the upstream's end."""
    go = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        await read_head(reader)
        writer.write(SWITCH)
        await go.wait()
        writer.write(PAYLOAD)
        await writer.drain()
        if abort:  # a reset, not a close: no linger, so the kernel sends RST
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    up = await ScriptedUpstream(script).start()
    upstreams.append(up)
    h = await gateway([route(up, websocket=True)], limits={"idle_timeout": idle_timeout})
    reader, writer = await asyncio.open_connection("127.0.0.1", h.gw.port)
    writer.write(UPGRADE)
    assert (await asyncio.wait_for(read_head(reader), 5)).startswith(b"HTTP/1.1 101 ")
    (conn,) = h.proxy.connections
    conn.transport.set_write_buffer_limits(high=64 * 1024 * 1024)
    go.set()
    await wait_for(lambda: conn.tunnel is None, 10, 0.01, "the upstream's end reaching the gateway")
    return conn, reader, writer


@pytest.fixture
async def upstreams() -> AsyncIterator[list[ScriptedUpstream]]:
    started: list[ScriptedUpstream] = []
    yield started
    for up in started:
        await up.close()


async def test_a_clean_end_delivers_every_byte_the_upstream_sent(gateway: Any, upstreams: list[ScriptedUpstream]) -> None:
    conn, reader, writer = await _tunnel(gateway, upstreams, abort=False)
    try:
        assert conn.transport.get_write_buffer_size() > 0  # the state under test: bytes still held
        got = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert len(got) == len(PAYLOAD)
    assert got == PAYLOAD


async def test_a_reset_upstream_cuts_the_client_off(gateway: Any, upstreams: list[ScriptedUpstream]) -> None:
    """A broken upstream must not look like a complete stream: the client's connection is dropped at
    once, with what the gateway still held for it (a reset or an early end, as the kernel has it)."""
    conn, reader, writer = await _tunnel(gateway, upstreams, abort=True)
    assert conn.transport.get_write_buffer_size() == 0  # what it held for the client is dropped, not sent
    got = bytearray()
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            got += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    assert conn.closed
    assert len(got) < len(PAYLOAD)


async def test_a_client_that_stops_reading_is_dropped_after_the_idle_timeout(gateway: Any, upstreams: list[ScriptedUpstream]) -> None:
    conn, _, writer = await _tunnel(gateway, upstreams, abort=False, idle_timeout="1s")
    loop = asyncio.get_running_loop()
    ended = loop.time()
    try:
        assert not conn.closed
        await wait_for(lambda: conn.closed, 5, 0.05, "the stalled client being dropped")
        assert loop.time() - ended >= 0.5, "dropped before its idle timeout"
    finally:
        writer.close()
