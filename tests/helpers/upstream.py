"""A recording upstream: a raw asyncio server that keeps every byte it receives.

Tests assert on `received` (were zero bytes forwarded?) and on `requests` (what exactly arrived,
header by header, with the body). Each request is answered by `respond(request) -> bytes | None`,
the raw bytes written back (None: say nothing, for timeouts; b"": close the connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools


@dataclass
class Received:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    chunked: bool = False

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower().encode():
                return v.decode("latin-1")
        return None

    def all(self, name: str) -> list[str]:
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == name.lower().encode()]


def ok(body: bytes = b"ok", status: int = 200, headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


Responder = Callable[[Received], bytes | None]


@dataclass
class _Conn(asyncio.Protocol):
    server: RecordingUpstream
    transport: asyncio.Transport | None = None
    parser: httptools.HttpRequestParser | None = None
    current: Received | None = None
    name: bytes = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.server.connections += 1

    def data_received(self, data: bytes) -> None:
        self.server.received += data
        try:
            assert self.parser is not None
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.server.parse_errors += 1
            assert self.transport is not None
            self.transport.close()

    def on_message_begin(self) -> None:
        self.current = Received("", b"", [])

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        self.current.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.current is not None
        self.current.headers.append((name, value))
        if name.lower() == b"transfer-encoding":
            self.current.chunked = True

    def on_headers_complete(self) -> None:
        assert self.current is not None and self.parser is not None
        self.current.method = self.parser.get_method().decode()

    def on_body(self, chunk: bytes) -> None:
        assert self.current is not None
        if self.server.keep_bodies:
            self.current.body += chunk
        self.server.body_bytes += len(chunk)

    def on_message_complete(self) -> None:
        req, self.current = self.current, None
        assert req is not None and self.transport is not None
        self.server.requests.append(req)
        out = self.server.respond(req)
        if out is None:
            return
        if out == b"":
            self.transport.close()
            return
        self.transport.write(out)


@dataclass
class RecordingUpstream:
    respond: Responder = field(default=lambda req: ok())
    keep_bodies: bool = True
    received: bytearray = field(default_factory=bytearray)
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    parse_errors: int = 0
    body_bytes: int = 0
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> RecordingUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
