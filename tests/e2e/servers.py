"""Upstreams for the end-to-end tests, run as their own process: `python servers.py [--tls CERT KEY]`.

The process prints `PORT <n>` on stdout once it listens on 127.0.0.1. Every path works under any
prefix (`/stream/upload` and `/x/upload` are the same endpoint):

- `POST …/upload[?slow_for=SECONDS]`: read the body without keeping it (slowly at first, if
  asked); answer {bytes, crc32, transfer_encoding, content_length}.
- `GET …/download?size=N&framing=length|chunked&seed=S`: N bytes generated on the fly, in 1 MiB
  blocks (`block(i, seed)`), framed with Content-Length or chunked.
- `GET …/slow?delay=SECONDS`: answer 200 after the delay.
- `GET …/ws`: a WebSocket echo; the text `send-and-close SEED N` gets N MiB (`base_block(SEED) * N`)
  back, then a close with code 4000.
- `GET …/__seen`: [method, path] of every request received so far (but these).
- anything else: a JSON echo of the method, path, headers, body size and the peer's port.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import zlib

from aiohttp import WSMsgType, web

BLOCK = 1 << 20


def base_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(BLOCK)


def block(i: int, base: bytes) -> bytes:
    """Block i of a generated stream: its index up front, so a lost or repeated block shows."""
    return i.to_bytes(8, "big") + base[8:]


def stream_crc(size: int, seed: int) -> int:
    base = base_block(seed)
    crc, i, left = 0, 0, size
    while left > 0:
        b = block(i, base)[: min(BLOCK, left)]
        crc = zlib.crc32(b, crc)
        left -= len(b)
        i += 1
    return crc


async def upload(request: web.Request) -> web.Response:
    n = crc = 0
    slow_until = asyncio.get_running_loop().time() + float(request.query.get("slow_for", "0"))
    while asyncio.get_running_loop().time() < slow_until:  # a slow reader first: 16 KiB per 10 ms
        chunk = await request.content.read(16384)
        if not chunk:
            break
        n += len(chunk)
        crc = zlib.crc32(chunk, crc)
        await asyncio.sleep(0.01)
    async for chunk in request.content.iter_any():
        n += len(chunk)
        crc = zlib.crc32(chunk, crc)
    return web.json_response(
        {
            "bytes": n,
            "crc32": crc,
            "transfer_encoding": request.headers.get("Transfer-Encoding"),
            "content_length": request.headers.get("Content-Length"),
        }
    )


async def download(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    seed = int(request.query.get("seed", "1"))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("framing", "length") == "length":
        resp.content_length = size
    else:
        resp.enable_chunked_encoding()
    await resp.prepare(request)
    base = base_block(seed)
    i, left = 0, size
    while left > 0:
        b = block(i, base)[: min(BLOCK, left)]
        await resp.write(b)
        left -= len(b)
        i += 1
    await resp.write_eof()
    return resp


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("delay", "1")))
    return web.json_response({"slow": True, "pid": os.getpid()})


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == WSMsgType.TEXT and msg.data.startswith("send-and-close "):
            seed, blocks = (int(x) for x in msg.data.split()[1:])
            await sock.send_bytes(base_block(seed) * blocks)
            await sock.close(code=4000, message=b"done")
        elif msg.type == WSMsgType.TEXT:
            await sock.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sock.send_bytes(msg.data)
    return sock


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return web.json_response(
        {
            "peer_port": peer[1] if peer else None,
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_bytes": len(body),
        }
    )


SEEN: list[list[str]] = []


async def dispatch(request: web.Request) -> web.StreamResponse:
    last = request.path.rstrip("/").rsplit("/", 1)[-1]
    if last == "__seen":
        return web.json_response(SEEN)
    SEEN.append([request.method, request.raw_path])
    if last == "upload" and request.method in ("POST", "PUT"):
        return await upload(request)
    if last == "download":
        return await download(request)
    if last == "slow":
        return await slow(request)
    if last == "ws":
        return await ws(request)
    return await echo(request)


async def main() -> None:
    ssl_ctx = None
    if len(sys.argv) == 4 and sys.argv[1] == "--tls":
        import ssl

        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    app = web.Application(client_max_size=1 << 40)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
