"""An upstream connection: the protocol that sends a request and parses its response with llhttp.

A connection goes back to the pool (`pool.py`) only when its last exchange was framed cleanly on
both sides; any doubt (parse error, early close, unread body, a byte while idle) discards it.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

import httptools

from gateway.errors import GatewayError
from gateway.http import outliers
from gateway.http.exchange import BODY_CHUNKED, Exchange
from gateway.http.heads import response_headers

if TYPE_CHECKING:
    from gateway.http.forwarding import Forwarding
    from gateway.http.pool import UpstreamPool
    from gateway.routing import Upstream

MAX_RESPONSE_HEADERS = 256
MAX_RESPONSE_HEAD_BYTES = 65536
# What a reason phrase may not hold (RFC 9112 §4 allows HTAB, SP, VCHAR, obs-text): llhttp lets these
# through. A compiled search: bytes.translate built its deletion table on every call.
_REASON_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
INF = float("inf")


# A closed connection's parser: a live one holds the connection's callbacks, a reference cycle.
DETACHED = httptools.HttpResponseParser(object())


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "client", "closed", "deadline", "eof_body", "ex", "head_bytes", "head_raw", "headers",
        "informational", "key", "parser", "pool", "read_timeout", "reason", "received", "reusable", "reused",
        "skip_body", "total_deadline", "transport", "tunnel", "upstream", "write_paused",
    )

    def __init__(self, pool: UpstreamPool, upstream: Upstream) -> None:
        self.pool = pool
        self.upstream = upstream
        self.key = upstream.key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.client: Forwarding | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = self.head_raw = 0
        self.reason = b""
        self.informational = False
        self.skip_body = False
        self.eof_body = False
        self.received = False
        self.reusable = True
        self.reused = False
        self.closed = False
        self.tunnel = False
        self.write_paused = False  # the upstream stopped reading what is sent (its socket buffer is full)
        self.deadline = INF
        self.total_deadline = INF
        self.read_timeout = INF

    # --- lifecycle -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = DETACHED  # no cycle with this connection left (see http/connection.py)
        self.pool.forget(self)
        ex, client = self.ex, self.client
        if ex is None or client is None:
            return
        self.ex = self.client = None
        if self.tunnel:
            client.tunnel_ended(clean=exc is None)
            return
        if self.eof_body and not self.informational:
            client.response_done(ex, self)  # close-delimited body ends here
            return
        retry = self.reused and not self.received and ex.body_kind == 0
        client.upstream_failed(
            ex, GatewayError("upstream_unavailable", "the upstream closed the connection"), retry
        )

    def close(self) -> None:
        self.reusable = False
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
        self.pool.forget(self)

    def abort(self) -> None:
        """Drop the connection now: the exchange it carried is being abandoned."""
        self.ex = self.client = None
        self.reusable = False
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()
        self.pool.forget(self)

    # --- sending ---------------------------------------------------------------------------
    def send(self, ex: Exchange, client: Forwarding, head: bytes, now: float) -> None:
        """Write the request head and whatever body is already buffered."""
        assert self.transport is not None
        if self.skip_body:  # the last exchange answered a HEAD: its parser cannot go on
            self.parser = httptools.HttpResponseParser(self)
        self.ex, self.client = ex, client
        self.headers = []
        self.head_bytes = self.head_raw = 0
        self.received = self.informational = self.skip_body = self.eof_body = False
        self.skip_body = ex.method == "HEAD"
        timeouts = ex.route.config.timeouts if ex.route is not None else None
        self.read_timeout = timeouts.read if timeouts else INF
        self.deadline = now + self.read_timeout
        total = timeouts.total if timeouts else None
        self.total_deadline = now + total if total else INF
        self.pool.busy.add(self)
        ex.upstream = self
        # One write (one syscall) for the head, the body buffered so far, and its end.
        parts = [head]
        chunks = ex.body_chunks
        if chunks:
            ex.body_chunks = None
            ex.buffered = 0
            if ex.body_kind == BODY_CHUNKED:
                for c in chunks:
                    parts += (b"%x\r\n" % len(c), c, b"\r\n")
            else:
                parts += chunks
        if ex.body_complete and ex.body_kind == BODY_CHUNKED:
            parts.append(b"0\r\n\r\n")
        if len(parts) == 1:
            self.transport.write(head)
        else:
            self.transport.writelines(parts)

    def send_body(self, chunk: bytes) -> None:
        assert self.transport is not None and self.ex is not None
        if self.ex.body_kind == BODY_CHUNKED:
            self.transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            self.transport.write(chunk)

    def end_body(self) -> None:
        assert self.transport is not None and self.ex is not None
        if self.ex.body_kind == BODY_CHUNKED:
            self.transport.write(b"0\r\n\r\n")

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.client is not None:
            self.client.pause_reading_for(self)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.client is not None:
            self.client.resume_reading_for(self)

    # --- receiving -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            if self.client is not None:
                self.client.tunnel_write(data)
            return
        if self.ex is None:
            self.close()  # a byte while idle: the stream can no longer be trusted
            return
        self.deadline = self.pool.loop.time() + self.read_timeout
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._start_tunnel(data[e.args[0] :])
        except httptools.HttpParserError:
            self._fail("the upstream sent a malformed response")
        else:
            # httptools holds a header line until it ends, where on_header cannot count it: while the
            # head is still open after a read, that whole read was head bytes.
            ex = self.ex
            if ex is not None and not ex.response_started:
                self.head_raw += len(data)
                if self.head_raw > MAX_RESPONSE_HEAD_BYTES:
                    self._fail("the upstream's response head is too large")
        client = self.client
        if client is not None and client.head_pending:
            client.flush_head()  # a head whose body did not come in this read goes out now

    def on_status(self, reason: bytes) -> None:
        # A control byte is never passed on to the client: the phrase is dropped (clients ignore it).
        self.reason = reason if _REASON_BAD.search(reason) is None else b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if len(self.headers) >= MAX_RESPONSE_HEADERS or self.head_bytes > MAX_RESPONSE_HEAD_BYTES:
            raise httptools.HttpParserError("response head too large")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex, client = self.ex, self.client
        if ex is None or client is None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.informational = True
            client.informational(ex, status, self.reason, self.headers)
            self.headers = []
            self.head_bytes = 0
            return
        self.informational = False
        up = self.upstream
        if up.failures or up.ejections:  # the common case costs no call
            outliers.answered(up)
        if status == 101:
            if not ex.upgrade:
                raise httptools.HttpParserError("unsolicited 101")
            self.reusable = False
            lines, length, _ = response_headers(self.headers, drop_upgrade=False)
            client.start_response(ex, status, self.reason, lines, length, upgrade=True)
            return
        lines, length, chunked = response_headers(self.headers, drop_upgrade=True)
        no_body = self.skip_body or status in (204, 304)
        if not no_body and length is None and not chunked:
            self.eof_body = True
            self.reusable = False
        if not self.parser.should_keep_alive():
            self.reusable = False
        client.start_response(ex, status, self.reason, lines, length, upgrade=False)
        if self.skip_body:
            # llhttp cannot be told a response answers HEAD: end the exchange here, and give the
            # next request a fresh parser; a body byte from the old one would be an anomaly.
            self.ex = self.client = None
            self._finish(ex, client)

    def on_body(self, chunk: bytes) -> None:
        if self.client is None or self.ex is None:
            raise httptools.HttpParserError("body after the exchange ended")
        self.client.response_body(self.ex, chunk)

    def on_message_complete(self) -> None:
        ex, client = self.ex, self.client
        if self.informational:
            self.informational = False
            return
        if ex is None or client is None:
            return
        if ex.upgrade and self.parser.get_status_code() == 101:
            return  # llhttp ends the 101 "message" before reporting the upgrade: the tunnel starts there
        self.ex = self.client = None
        self._finish(ex, client)

    def _finish(self, ex: Exchange, client: Forwarding) -> None:
        self.pool.busy.discard(self)
        if not ex.body_complete:
            self.reusable = False  # the upstream answered before the body ended
        client.response_done(ex, self)

    def _fail(self, detail: str) -> None:
        ex, client = self.ex, self.client
        self.abort()
        if ex is not None and client is not None:
            client.upstream_failed(ex, GatewayError("upstream_unavailable", detail), False)

    def on_timeout(self) -> None:
        ex, client = self.ex, self.client
        self.abort()
        if ex is not None and client is not None:
            client.upstream_failed(
                ex, GatewayError("upstream_timeout", "the upstream did not answer in time"), False
            )

    # --- tunnels (WebSocket after 101) -----------------------------------------------------
    def _start_tunnel(self, rest: bytes) -> None:
        self.tunnel = True
        self.deadline = self.total_deadline = INF
        self.pool.busy.discard(self)
        if self.client is not None:
            self.client.start_tunnel(self)
            if rest:
                self.client.tunnel_write(rest)

    def tunnel_write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

