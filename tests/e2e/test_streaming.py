"""Bodies stream through with back-pressure: 1 GiB each way, both framings, in flat memory.

The gateway runs as its own process (`python -m gateway run`), and so does the upstream, so the
gateway's RSS, read from /proc/PID/status while the bytes flow, is its own.
"""

from __future__ import annotations

import asyncio
import socket
import time
import zlib
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.e2e.servers import BLOCK, base_block, block, stream_crc
from tests.e2e.support import GatewayProcess, Launcher, RssSampler, Server, http_get

GiB = 1 << 30
MiB = 1 << 20
RSS_HEADROOM = 64 * MiB  # peak RSS during a transfer stays below the baseline plus this
TRANSFER_TIMEOUT = 60.0
SEED = 7

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def streaming(module_launch: Launcher) -> tuple[GatewayProcess, Server]:
    up = module_launch.server()
    gw = module_launch.gateway(
        [{"name": "stream", "path": "/stream", "upstream": up.url, "auth": "none", "max_body": "2GiB"}]
    )
    status, _ = http_get(gw.url + "/stream/warm-up")
    assert status == 200
    return gw, up


async def generated(size: int, crc: list[int]) -> AsyncIterator[bytes]:
    """`size` bytes in 1 MiB blocks made on the fly; their CRC-32 is left in crc[0]."""
    base = base_block(SEED)
    i, left = 0, size
    while left > 0:
        b = block(i, base)[: min(BLOCK, left)]
        crc[0] = zlib.crc32(b, crc[0])
        left -= len(b)
        i += 1
        yield b


async def upload(gw: GatewayProcess, size: int, chunked: bool, query: str = "") -> tuple[dict[str, object], int]:
    crc = [0]
    headers = {"Content-Type": "application/octet-stream"}
    if not chunked:
        headers["Content-Length"] = str(size)  # aiohttp streams an async iterator chunked unless told the length
    timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as s,
        s.post(gw.url + "/stream/upload" + query, data=generated(size, crc), headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        doc: dict[str, object] = await r.json()
    return doc, crc[0]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_1gib_upload_streams_in_flat_memory(streaming: tuple[GatewayProcess, Server], chunked: bool) -> None:
    gw, _ = streaming
    baseline = gw.rss()
    started = time.monotonic()
    with RssSampler(gw.pid) as rss:
        doc, crc = await upload(gw, GiB, chunked)
    elapsed = time.monotonic() - started
    assert doc["bytes"] == GiB
    assert doc["crc32"] == crc
    if chunked:
        assert doc["transfer_encoding"] == "chunked" and doc["content_length"] is None
    else:
        assert doc["content_length"] == str(GiB) and doc["transfer_encoding"] is None
    assert rss.samples > 5, "the transfer was too quick to sample"
    assert rss.peak < baseline + RSS_HEADROOM, (
        f"gateway RSS rose from {baseline / MiB:.1f} MiB to {rss.peak / MiB:.1f} MiB ({elapsed:.1f}s)"
    )


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_1gib_download_streams_in_flat_memory(streaming: tuple[GatewayProcess, Server], framing: str) -> None:
    gw, _ = streaming
    expected = stream_crc(GiB, SEED)
    baseline = gw.rss()
    n = crc = 0
    timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT)
    started = time.monotonic()
    with RssSampler(gw.pid) as rss:
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.get(gw.url + f"/stream/download?size={GiB}&framing={framing}&seed={SEED}") as r,
        ):
            assert r.status == 200
            if framing == "length":
                assert r.headers["Content-Length"] == str(GiB)
                assert "Transfer-Encoding" not in r.headers
            else:
                assert r.headers["Transfer-Encoding"] == "chunked"
                assert "Content-Length" not in r.headers
            async for chunk in r.content.iter_any():
                n += len(chunk)
                crc = zlib.crc32(chunk, crc)
    elapsed = time.monotonic() - started
    assert n == GiB
    assert crc == expected
    assert rss.samples > 5
    assert rss.peak < baseline + RSS_HEADROOM, (
        f"gateway RSS rose from {baseline / MiB:.1f} MiB to {rss.peak / MiB:.1f} MiB ({elapsed:.1f}s)"
    )


async def _open_small_buffer(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client socket with a small receive buffer, so the kernel absorbs little of what is sent."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=64 * 1024)


async def test_slow_reading_client_does_not_make_the_gateway_buffer(
    streaming: tuple[GatewayProcess, Server],
) -> None:
    """A fast upstream, a client reading 16 KiB per 10 ms: the gateway stops reading the upstream."""
    gw, _ = streaming
    size = 200 * MiB
    expected = stream_crc(size, SEED)
    baseline = gw.rss()
    reader, writer = await _open_small_buffer(gw.port)
    try:
        writer.write(f"GET /stream/download?size={size}&seed={SEED} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"content-length: {size}\r\n".encode() in head.lower()
        n = crc = 0
        with RssSampler(gw.pid) as rss:
            slow_until = time.monotonic() + 3.0
            while time.monotonic() < slow_until:
                chunk = await reader.read(16 * 1024)
                assert chunk
                n += len(chunk)
                crc = zlib.crc32(chunk, crc)
                await asyncio.sleep(0.01)
            slow_peak = rss.peak
            while n < size:  # then read the rest at full speed
                chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
                assert chunk
                n += len(chunk)
                crc = zlib.crc32(chunk, crc)
        assert n == size and crc == expected
        assert slow_peak < baseline + RSS_HEADROOM, (
            f"gateway RSS rose from {baseline / MiB:.1f} MiB to {slow_peak / MiB:.1f} MiB under a slow reader"
        )
        assert rss.peak < baseline + RSS_HEADROOM
    finally:
        writer.close()


async def test_slow_reading_upstream_does_not_make_the_gateway_buffer(
    streaming: tuple[GatewayProcess, Server],
) -> None:
    """A fast client, an upstream reading 16 KiB per 10 ms for 3 s: the gateway stops reading the client."""
    gw, _ = streaming
    size = 200 * MiB
    baseline = gw.rss()
    with RssSampler(gw.pid) as rss:
        doc, crc = await upload(gw, size, chunked=False, query="?slow_for=3")
    assert doc["bytes"] == size and doc["crc32"] == crc
    assert rss.peak < baseline + RSS_HEADROOM, (
        f"gateway RSS rose from {baseline / MiB:.1f} MiB to {rss.peak / MiB:.1f} MiB under a slow upstream"
    )


async def test_pooled_upstream_connection_works_after_a_slowly_read_download(
    streaming: tuple[GatewayProcess, Server],
) -> None:
    """The last bytes of a download that the client reads late pause the upstream connection; once
    back in the pool it must read again, or the next request on it hangs until the read timeout."""
    gw, _ = streaming
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(f"GET /stream/download?size={4 * MiB} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            await asyncio.sleep(0.3)  # the whole body reaches the gateway while the client reads nothing
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            body = await asyncio.wait_for(reader.readexactly(4 * MiB), 10)
            assert len(body) == 4 * MiB
        finally:
            writer.close()
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for _ in range(5):
            async with s.get(gw.url + "/stream/after") as r:
                assert r.status == 200
                assert (await r.json())["path"] == "/stream/after"
    assert time.monotonic() - started < 3.0
