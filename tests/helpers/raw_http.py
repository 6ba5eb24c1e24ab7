"""A raw HTTP/1.1 client for tests: exact bytes out, responses read off the wire byte for byte."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class Resp:
    """A response as read off the wire (here, and by the proxy tests' own parser in tests/proxy/wire.py)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    head: bytes = b""
    reason: str = ""
    complete: bool = True  # False: the connection ended before the framing said the body did

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        if self.header("content-type") != "application/problem+json":
            return None
        return str(self.json().get("code"))

    @property
    def request_id(self) -> str:
        rid = self.header("x-request-id")
        assert rid, self.headers
        return rid


def request_bytes(method: str, target: str, headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{n}: {v}" for n, v in headers or []]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Conn:
    """One keep-alive client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def read_response(self, timeout: float = 10.0, head_only: bool = False) -> Resp:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
        resp = Resp(int(lines[0].split(" ")[1]), headers, head=head)
        if head_only or resp.status in (204, 304):
            return resp
        length = resp.header("content-length")
        if length is not None:
            resp.body = await asyncio.wait_for(self.reader.readexactly(int(length)), timeout)
        elif (resp.header("transfer-encoding") or "").lower() == "chunked":
            while True:
                size = int((await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)).strip(), 16)
                chunk = await asyncio.wait_for(self.reader.readexactly(size + 2), timeout)
                if size == 0:
                    break
                resp.body += chunk[:-2]
        return resp

    async def send(self, raw: bytes) -> Resp:
        self.writer.write(raw)
        await self.writer.drain()
        return await self.read_response(head_only=raw.startswith(b"HEAD "))

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> Resp:
        return await self.send(request_bytes(method, target, headers, body))

    async def many(self, raws: list[bytes]) -> list[Resp]:
        """Pipeline the requests, then read one response each."""
        self.writer.write(b"".join(raws))
        await self.writer.drain()
        return [await self.read_response() for _ in raws]

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def call(port: int, method: str, target: str, headers: list[tuple[str, str]] | None = None,
               body: bytes = b"") -> Resp:
    """One request on a fresh connection."""
    conn = await Conn.open(port)
    try:
        return await conn.request(method, target, headers, body)
    finally:
        await conn.close()


async def call_raw(port: int, raw: bytes) -> Resp:
    conn = await Conn.open(port)
    try:
        return await conn.send(raw)
    finally:
        await conn.close()
