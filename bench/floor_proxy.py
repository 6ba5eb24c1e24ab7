"""The floor: the least a Python reverse proxy can do per request, measured beside the gateway.

PERFORMANCE.md's last row ("bare asyncio.Protocol on httptools + purpose-built upstream pool,
uvloop"): llhttp parses both sides, a pooled keep-alive upstream connection carries the request,
and the answer is written back in one call. No routing, no key, no limit, no header hygiene, no
metrics, no usage record, no timeouts: it is not a gateway, only the price of the sockets, the
event loop and the smallest Python on top. What the gateway costs above it is its features and
its own Python; what it costs is the part no Python proxy avoids.

    python -m bench.floor_proxy PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None
        self.lines: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.close()

    def send(self, client: Client, head: bytes) -> None:
        assert self.transport is not None
        self.client = client
        self.transport.write(head)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.abort()

    def on_status(self, reason: bytes) -> None:
        self.lines = [b"HTTP/1.1 %d " % self.parser.get_status_code(), reason, b"\r\n"]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.lines.append(b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.lines.append(body)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.answer(b"".join(self.lines))
        self.pool.append(self)


class Client(asyncio.Protocol):
    def __init__(self, pool: list[Upstream], upstream_port: int) -> None:
        self.pool = pool
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.lines: list[bytes] = []
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False

    def close(self) -> None:
        if self.open and self.transport is not None:
            self.open = False
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def on_url(self, url: bytes) -> None:
        self.lines = [self.parser.get_method(), b" ", url, b" HTTP/1.1\r\n"]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines += (name, b": ", value, b"\r\n")

    def on_message_complete(self) -> None:
        self.lines.append(b"\r\n")
        head = b"".join(self.lines)
        if self.pool:
            self.pool.pop().send(self, head)
        else:
            asyncio.get_running_loop().create_task(self._connect(head))

    async def _connect(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: Upstream(self.pool), "127.0.0.1", self.upstream_port)
        except OSError:
            self.close()
            return
        up.send(self, head)

    def answer(self, response: bytes) -> None:
        if self.open and self.transport is not None:
            self.transport.write(response)


async def serve(port: int, upstream_port: int) -> None:
    pool: list[Upstream] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(pool, upstream_port), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    uvloop.run(serve(port, upstream_port))


if __name__ == "__main__":
    main()
