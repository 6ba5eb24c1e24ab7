"""Raw-socket plumbing for the proxy tests: a client that reads responses byte for byte, a scripted
upstream for the misbehaviours a recording upstream cannot produce, and problem+json assertions.

The response parser here is deliberately independent of the gateway's (no httptools): it reads what
is on the wire, so a framing bug in the gateway shows up as a parse failure or a wrong body.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tests.helpers.gateway import RunningProxy, make_config, start_proxy
from tests.helpers.polling import wait_for
from tests.helpers.raw_http import Resp
from tests.helpers.upstream import RecordingUpstream, ok

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


class Incomplete(Exception):
    """The buffer does not hold a whole response yet."""


def parse_one(buf: bytes, head_only: bool = False, eof: bool = False) -> tuple[Resp, int]:
    """Parse one response from the start of buf; return it and the bytes it used."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        raise Incomplete
    lines = buf[:end].decode("latin-1").split("\r\n")
    version, status, *rest = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        assert sep and name == name.strip(), f"malformed response header line {line!r}"
        headers.append((name, value.strip()))
    resp = Resp(int(status), headers, reason=rest[0] if rest else "")
    pos = end + 4
    code = resp.status
    if head_only or 100 <= code < 200 or code in (204, 304):
        return resp, pos
    te = resp.header("transfer-encoding")
    cl = resp.all("content-length")
    assert not (te and cl), "a response with both Content-Length and Transfer-Encoding"
    assert len(cl) <= 1, "a response with two Content-Length headers"
    if cl:
        n = int(cl[0])
        if len(buf) - pos < n:
            if eof:
                resp.body, resp.complete = buf[pos:], False
                return resp, len(buf)
            raise Incomplete
        resp.body = buf[pos : pos + n]
        return resp, pos + n
    if te:
        assert te.lower() == "chunked", te
        body = bytearray()
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(buf[pos:nl], 16)
            if len(buf) < nl + 2 + size + 2:
                break
            assert buf[nl + 2 + size : nl + 4 + size] == b"\r\n", "chunk data not followed by CRLF"
            body += buf[nl + 2 : nl + 2 + size]
            pos = nl + 4 + size
            if size == 0:
                resp.body = bytes(body)
                return resp, pos
        if eof:
            resp.body, resp.complete = bytes(body), False
            return resp, len(buf)
        raise Incomplete
    # close-delimited
    if not eof:
        raise Incomplete
    resp.body = buf[pos:]
    return resp, len(buf)


class Client:
    """One raw TCP connection to the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = b""
        self.eof = False
        self.reset = False

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            await self.writer.drain()
        except ConnectionError:
            self.reset = True

    async def _fill(self, deadline: float) -> bool:
        """Read more bytes; False at EOF. Raises TimeoutError past the deadline."""
        if self.eof:
            return False
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError
        try:
            data = await asyncio.wait_for(self.reader.read(262144), left)
        except (ConnectionResetError, BrokenPipeError):
            data, self.reset = b"", True
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def response(self, timeout: float = 3.0, head_only: bool = False) -> Resp:
        """The next response (a 1xx counts as one). Raises EOFError if the connection ends first."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.buf:
                try:
                    resp, used = parse_one(self.buf, head_only, self.eof)
                except Incomplete:
                    pass
                else:
                    self.buf = self.buf[used:]
                    return resp
            if not await self._fill(deadline):
                if self.buf:
                    try:
                        resp, used = parse_one(self.buf, head_only, eof=True)
                    except Incomplete:
                        raise EOFError(
                            f"connection ended inside a response head: {self.buf[:200]!r}"
                        ) from None
                    self.buf = self.buf[used:]
                    return resp
                raise EOFError("connection ended")

    async def responses(self, timeout: float = 3.0) -> list[Resp]:
        """Every response until the gateway closes the connection (fails if it does not)."""
        out = []
        while True:
            try:
                out.append(await self.response(timeout))
            except EOFError:
                return out

    async def closed(self, timeout: float = 3.0) -> bool:
        """True when the gateway closes (FIN or RST) within timeout with no further byte."""
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while await self._fill(deadline):
                pass
        except TimeoutError:
            return False
        return True

    async def still_open(self, wait: float = 0.15) -> bool:
        """True when nothing arrives and the connection stays open for `wait` seconds."""
        try:
            await self._fill(asyncio.get_running_loop().time() + wait)
        except TimeoutError:
            return True
        return False  # a byte arrived, or the connection ended

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


@dataclass
class Harness:
    """A running gateway plus the raw clients a test opened (all closed at teardown)."""

    gw: RunningProxy
    clients: list[Client] = field(default_factory=list)

    @property
    def proxy(self) -> Any:
        return self.gw.proxy

    @property
    def url(self) -> str:
        return self.gw.url

    async def client(self) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.gw.port)
        c = Client(reader, writer)
        self.clients.append(c)
        return c

    async def send(self, data: bytes) -> Client:
        c = await self.client()
        await c.send(data)
        return c

    async def one(self, data: bytes, timeout: float = 3.0, head_only: bool = False) -> Resp:
        """Send raw bytes on a fresh connection and return the first response."""
        c = await self.send(data)
        return await c.response(timeout, head_only)

    async def close(self) -> None:
        for c in self.clients:
            c.close()
        await self.gw.close()


def route(up: RecordingUpstream | str, **kw: Any) -> dict[str, Any]:
    """A route with no authentication (these tests are about the transport, not keys)."""
    url = up if isinstance(up, str) else up.url
    out: dict[str, Any] = {"name": "r", "path": "/", "upstream": url, "auth": "none"}
    out.update(kw)
    return out


async def start(routes: list[dict[str, Any]], **top: Any) -> Harness:
    return Harness(await start_proxy(make_config(routes, **top)))


def get(target: str = "/", host: str = "a.test", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {target} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


def assert_problem(resp: Resp, status: int, code: str) -> dict[str, Any]:
    """An error the gateway produced itself: status, problem+json, the stable code, a request id."""
    assert resp.status == status, (resp.status, resp.body[:300])
    assert resp.header("content-type") == "application/problem+json", resp.headers
    doc = resp.json()
    assert doc["code"] == code, doc
    assert doc["status"] == status, doc
    assert int(resp.header("content-length") or -1) == len(resp.body)
    return doc


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until check() holds (an upstream received something, say)."""
    await wait_for(check, timeout, 0.005, "the condition")


class ScriptedUpstream:
    """An upstream whose every connection runs `script(reader, writer, index)`.

    For what RecordingUpstream cannot do: answer late, write part of a response and then close,
    answer before the request body ends. `index` counts connections from 0 (see `read_head`).
    """

    def __init__(self, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]):
        self.script = script
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        try:
            await self.script(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the gateway hung up, or the test is over
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


POST = "POST /p HTTP/1.1\r\nHost: a.test\r\n"


async def warm(h: Harness, up: RecordingUpstream) -> int:
    """Leave one idle keep-alive connection in the gateway's upstream pool; return bytes seen so far."""
    c = await h.send(get("/warm"))
    assert (await c.response()).status == 200
    c.close()
    assert up.connections == 1
    return len(up.received)


async def dribble(c: Client, piece: bytes, times: int) -> None:
    """Send `piece` `times` times in separate reads (until the gateway hangs up)."""
    for _ in range(times):
        await c.send(piece)
        await asyncio.sleep(0.002)
        if c.reset or c.writer.is_closing():
            return


async def assert_refused(h: Harness, up: RecordingUpstream, data: bytes, status: int, code: str) -> None:
    """Warm the pool, send `data`, expect one problem answer, a closed connection, nothing forwarded."""
    before = await warm(h, up)
    c = await h.send(data)
    assert_problem(await c.response(), status, code)
    assert await c.closed(), "the connection must be closed after a framing error"
    await asyncio.sleep(0.05)
    assert len(up.received) == before, bytes(up.received[before:])
    assert [r.target for r in up.requests] == [b"/warm"]


def raw_response(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def then_ok(first: bytes) -> Callable[[Any], bytes]:
    """A responder answering the first request with `first` and every later one with ok(target)."""
    calls = itertools.count()
    return lambda req: first if next(calls) == 0 else ok(req.target)
