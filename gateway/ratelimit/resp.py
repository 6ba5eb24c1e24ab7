"""One pipelined connection to Redis for the limiter's hot path: RESP in, hiredis out, no task per reply.

redis-py's asyncio client reads each reply in its own chain of coroutines and packs each command
through its general encoder; per decision that cost more than the whole memory limiter
(bench/limiter_micro.py). Here a batch of commands is one `write`, and the replies are parsed by
hiredis in `data_received` and handed to the batch's callback in order. redis-py stays for its URL
parsing and for everything off the hot path.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from redis.connection import SSLConnection, parse_url


class ConnectionLost(Exception):
    """The connection closed or broke while replies were still due."""


def bulk(value: object) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(*args: object) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(bulk(a) for a in args)


class Waiter:
    """Replies due to one write, in order; `done` is called once with all of them or with an error."""

    __slots__ = ("done", "expected", "replies")

    def __init__(self, expected: int, done: Callable[[Waiter, BaseException | None], None]) -> None:
        self.expected = expected
        self.replies: list[Any] = []
        self.done = done


class RespConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.pending: deque[Waiter] = deque()
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.open = True

    def send(self, blob: bytes, waiter: Waiter) -> None:
        assert self.transport is not None
        self.pending.append(waiter)
        self.transport.write(blob)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.pending
        waiter = pending[0] if pending else None
        try:
            while (reply := reader.gets()) is not False:
                if waiter is None:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                replies = waiter.replies
                replies.append(reply)
                if len(replies) == waiter.expected:
                    pending.popleft()
                    waiter.done(waiter, None)
                    waiter = pending[0] if pending else None
        except hiredis.ProtocolError as e:
            self.abort(e)

    def abort(self, why: BaseException | None = None) -> None:
        """Out of step or too slow: nothing more is read from this connection."""
        if self.transport is not None:
            self.transport.abort()
        self._fail(why)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc)

    def _fail(self, why: BaseException | None) -> None:
        self.open = False
        if not self.pending:
            return
        err = why if isinstance(why, Exception) else ConnectionLost("closed by Redis")
        pending, self.pending = self.pending, deque()
        for waiter in pending:
            waiter.done(waiter, err)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self._fail(None)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: ssl.SSLContext | None
    first: list[bytes] = field(repr=False)  # AUTH (a password) and SELECT, sent first on a new connection


# URL options the limiter's connection honours; any other is refused rather than silently ignored.
_TLS_OPTIONS = frozenset(["ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname", "ssl_cert_reqs"])
_PLAIN_OPTIONS = frozenset(["host", "port", "db", "username", "password", "connection_class"])
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def url_options(url: str) -> dict[str, Any]:
    """A redis:// or rediss:// URL's options, checked; ValueError for a URL that cannot be used, with
    a message that quotes no value of it (it may hold a password)."""
    try:
        opts: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:
        raise ValueError("not a usable Redis URL: check the port, and percent-encode the password") from None
    tls = opts.get("connection_class") is SSLConnection
    unknown = sorted(set(opts) - _PLAIN_OPTIONS - (_TLS_OPTIONS if tls else frozenset()))
    if unknown:
        raise ValueError(
            f"Redis URL option(s) {', '.join(unknown)} not supported here "
            "(the limiter's timeout is ratelimit.timeout; TLS options need rediss://)"
        )
    reqs = str(opts.get("ssl_cert_reqs", "required")).lower()
    if reqs not in _CERT_REQS:
        raise ValueError("ssl_cert_reqs in the Redis URL must be none, optional or required")
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in opts and not os.path.isfile(opts[name]):
            raise ValueError(f"the file named by {name} in the Redis URL does not exist")
    return opts


def _tls_context(opts: dict[str, Any]) -> ssl.SSLContext:
    """As redis-py builds it from the same options: the system CAs or ssl_ca_certs, an optional client
    certificate, and ssl_cert_reqs (none: no verification at all; optional: verified when sent)."""
    ctx = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
    if "ssl_certfile" in opts:
        ctx.load_cert_chain(opts["ssl_certfile"], opts.get("ssl_keyfile"))
    reqs = _CERT_REQS[str(opts.get("ssl_cert_reqs", "required")).lower()]
    ctx.check_hostname = bool(opts.get("ssl_check_hostname", True)) and reqs != ssl.CERT_NONE
    ctx.verify_mode = reqs
    return ctx


def endpoint(url: str) -> Endpoint:
    """Where a redis:// or rediss:// URL points, and what to send first (see url_options)."""
    opts = url_options(url)
    tls = _tls_context(opts) if opts.get("connection_class") is SSLConnection else None
    first = []
    if opts.get("password"):
        user = opts.get("username")
        first.append(command("AUTH", user, opts["password"]) if user else command("AUTH", opts["password"]))
    if opts.get("db"):
        first.append(command("SELECT", opts["db"]))
    return Endpoint(opts.get("host", "localhost"), opts.get("port", 6379), tls, first)


async def connect(where: Endpoint, timeout: float) -> RespConnection:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(
            RespConnection, where.host, where.port, ssl=where.tls, server_hostname=where.host if where.tls else None
        ),
        timeout,
    )
    return conn
