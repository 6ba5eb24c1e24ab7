"""The client side of the data path: an asyncio protocol on llhttp (httptools, strict).

Requests are parsed as bytes arrive and answered strictly in order (pipelining). Bodies stream:
a request body goes straight to the upstream socket once the checks pass, and is buffered only
up to a high-water mark before that, with reading paused past it. Either side's full send buffer
pauses reading on the other side.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable
from time import perf_counter
from typing import TYPE_CHECKING

import httptools

from gateway.errors import DirectResponse, GatewayError, reason
from gateway.http.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, Exchange
from gateway.http.heads import request_head, response_headers

if TYPE_CHECKING:
    from gateway.http.upstream import UpstreamConnection
    from gateway.proxy import ProxyServer

log = logging.getLogger("gateway.http")

INF = float("inf")
HIGH_WATER = 256 * 1024
PAUSE_BUFFER = 1
PAUSE_UPSTREAM = 2
IDEMPOTENT = frozenset(["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
LINGER = 2.0
DISCARD_LIMIT = 64 * 1024

# What a deadline means when it passes.
D_HEADER, D_BODY, D_IDLE, D_LINGER = 1, 2, 3, 4


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the reason is kept on the connection."""


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.queue: deque[Exchange] = deque()
        self.current: Exchange | None = None
        self.active: Exchange | None = None
        self.closed = False
        self.closing = False
        self.stop_parsing = False
        self.final_error: GatewayError | None = None
        self.pending_error: GatewayError | None = None
        self.read_paused = 0
        self.write_paused = False
        self.head_bytes = 0
        self.header_count = 0
        self.head_raw = 0
        self.begun = 0
        self.in_body = False
        self.deadline = INF
        self.deadline_kind = 0
        self.chunked_out = False
        self.head_pending = b""
        self.tunnel: UpstreamConnection | None = None
        self.upgrade_rest = b""

    # --- connection lifecycle ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = self.server.normalise_peer(peer[0] if peer else "")
        self.server.connections.add(self)
        self.deadline = self.loop.time() + self.server.header_timeout
        self.deadline_kind = D_HEADER
        if len(self.server.connections) > self.server.max_connections:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        ex = self.active
        if ex is not None:
            self.active = None
            if ex.upstream is not None:
                ex.upstream.abort()
                ex.upstream = None
            if not ex.done:
                ex.done = True
                ex.status = ex.status or 499
                self.server.record(ex)
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        self.queue.clear()

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self.stop_parsing = True
            self.transport.close()

    def abort(self) -> None:
        self.closing = self.stop_parsing = True
        self.transport.abort()

    # --- parsing ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.tunnel_write(data)
            return
        if self.stop_parsing:
            return
        cur = self.current
        begun, between = self.begun, cur is None
        body_before = cur.body_received if cur is not None and self.in_body else -1
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.stop_parsing = True
            self.upgrade_rest = data[e.args[0] :]
        except httptools.HttpParserCallbackError:
            err = self.pending_error
            if err is None:
                log.exception("request handling failed")
                err = GatewayError("internal_error", "the gateway failed to handle this request", close=True)
            self._parse_failed(err)
        except httptools.HttpParserError as e:
            self._parse_failed(GatewayError("bad_request", f"malformed HTTP request ({_parser_reason(e)})", close=True))
        else:
            if self.current is None or self.stop_parsing:
                return
            # Inside a message. httptools holds a header (or trailer) line until it ends, out of the
            # callbacks' sight, so count raw bytes too. In a head: all of this read if the head began
            # before it (or between messages); a head that began after another message ended here is
            # under-counted by at most this one read. In a body: reads that carried no body byte
            # (chunk framing, trailers).
            if self.in_body:
                if self.current is not cur or cur.body_received != body_before:
                    self.head_raw = 0
                    return
                self.head_raw += len(data)
            elif self.begun == begun:
                self.head_raw += len(data)
            elif between and self.begun == begun + 1:
                self.head_raw = len(data)
            if self.head_raw > self.server.max_header_bytes:
                self._parse_failed(
                    GatewayError("headers_too_large", "the request's header section is too large", close=True)
                )

    def _refuse(self, err: GatewayError) -> None:
        self.pending_error = err
        raise _Refused

    def _parse_failed(self, err: GatewayError) -> None:
        """Stop reading; answer in order after whatever is already queued, then close."""
        self.stop_parsing = True
        if self.closing:
            # The rest of a read in which a refusal already answered and closed (or half-closed)
            # the connection: a second answer would be written after EOF.
            self.current = None
            return
        ex, self.current = self.current, None
        if ex is not None and ex is self.active:
            self._reject(ex, err)
            return
        if ex is not None and ex in self.queue:
            self.queue.remove(ex)
        if self.active is None and not self.queue:
            self._write_problem(None, err, close=True)
        else:
            self.final_error = err

    def on_message_begin(self) -> None:
        if self.stop_parsing:
            return
        self.current = Exchange(self.loop.time(), perf_counter())
        self.head_bytes = self.header_count = self.head_raw = 0
        self.begun += 1
        self.in_body = False
        if self.active is None and not self.queue:
            self.deadline = self.loop.time() + self.server.header_timeout
            self.deadline_kind = D_HEADER

    def on_url(self, url: bytes) -> None:
        ex = self.current
        if ex is None:
            return
        ex.target += url
        self.head_bytes += len(url)
        if self.head_bytes > self.server.max_header_bytes:
            self._refuse(GatewayError("headers_too_large", "the request target is too long", close=True))

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.current
        if ex is None:
            return
        self.head_bytes += len(name) + len(value) + 4
        self.header_count += 1
        if self.head_bytes > self.server.max_header_bytes or self.header_count > self.server.max_headers:
            self._refuse(GatewayError("headers_too_large", "the request's header section is too large", close=True))
        if self.in_body:
            return  # a trailer: counted against the limits, never merged or forwarded
        name = name.lower()
        if b"_" in name:
            policy = self.server.underscores
            if policy == "drop":
                return
            if policy == "reject":
                self._refuse(GatewayError("bad_request", "header names with '_' are not accepted", close=True))
        ex.headers.append((name, value))
        if name == b"host":
            ex.host_count += 1
            ex.host_raw = value
        elif name == b"content-length":
            ex.body_kind = BODY_LENGTH
            ex.content_length = int(value)
        elif name == b"transfer-encoding":
            # llhttp runs on_headers_complete before it rejects some codings (`xchunked`) and accepts
            # others (`,chunked`, `gzip, chunked`, two lines): only one plain `chunked` is framing we
            # can re-send faithfully, so refuse the rest before the head could be forwarded.
            if ex.body_kind == BODY_CHUNKED or value.strip().lower() != b"chunked":
                self._refuse(GatewayError("bad_request", "only 'Transfer-Encoding: chunked' is accepted", close=True))
            ex.body_kind = BODY_CHUNKED
        elif name == b"connection":
            ex.has_connection_header = True
        elif name == b"expect":
            ex.expect_continue = 1 if value.strip().lower() == b"100-continue" else 2

    def on_headers_complete(self) -> None:
        ex = self.current
        if ex is None:
            return
        self.in_body = True
        p = self.parser
        ex.method = p.get_method().decode("ascii")
        version = p.get_http_version()
        if version != "1.1":
            if version != "1.0":  # llhttp accepts any digit pair: HTTP/2.0, HTTP/0.9, HTTP/1.2
                self._refuse(GatewayError("bad_request", "only HTTP/1.1 and HTTP/1.0 are served", close=True))
            ex.version = b"1.0"
        ex.keep_alive = p.should_keep_alive()
        ex.upgrade = p.should_upgrade()
        if ex.body_kind == BODY_LENGTH and ex.content_length == 0:
            ex.body_kind = BODY_NONE
        if ex.body_kind == BODY_NONE:
            ex.body_complete = True
        elif ex.upgrade:
            # llhttp hands everything after an upgrade head over as tunnel bytes, body included: it
            # would never reach on_body, and the upstream would wait for a body that never comes.
            self._refuse(GatewayError("bad_request", "a protocol upgrade request cannot carry a body", close=True))
        else:
            self.deadline = self.loop.time() + self.server.body_timeout
            self.deadline_kind = D_BODY
        if len(self.queue) + (self.active is not None) >= self.server.max_pipelined:
            # Read no further: answer what is queued, then close.
            self.stop_parsing = True
            self.current = None
            (self.queue[-1] if self.queue else self.active).keep_alive = False  # type: ignore[union-attr]
            return
        self.queue.append(ex)
        if self.active is None:
            self._start_next()

    def on_body(self, chunk: bytes) -> None:
        ex = self.current
        if ex is None or ex.done:
            return
        n = len(chunk)
        ex.body_received += n
        self.deadline = self.loop.time() + self.server.body_timeout
        if ex.discarding:
            return
        route = ex.route
        if route is not None and ex.body_received > route.config.max_body:
            self._refuse(
                GatewayError(
                    "payload_too_large",
                    f"the body exceeds this route's limit of {route.config.max_body} bytes",
                    close=True,
                )
            )
        up = ex.upstream
        if up is not None:
            up.send_body(chunk)
            return
        if ex.body_chunks is None:
            ex.body_chunks = []
        ex.body_chunks.append(chunk)
        ex.buffered += n
        if ex.buffered > HIGH_WATER:
            self._pause(PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        ex = self.current
        if ex is None:
            return
        self.current = None
        self.in_body = False
        ex.body_complete = True
        if ex.upstream is not None:
            ex.upstream.end_body()
        if self.deadline_kind == D_BODY:
            self.deadline = INF
            self.deadline_kind = 0
        if ex.discarding:
            ex.discarding = False
            self._complete(ex)

    # --- running an exchange ----------------------------------------------------------------
    def _start_next(self) -> None:
        if self.closed or self.closing or self.active is not None or not self.queue:
            return
        ex = self.queue.popleft()
        self.active = ex
        try:
            pending = self.server.pipeline.begin(ex, self.peer)
            if ex.body_received > ex.route.config.max_body:  # type: ignore[union-attr]
                raise GatewayError("payload_too_large", "the body exceeds this route's limit", close=True)
        except Exception as e:
            self._stage_failed(ex, e)
            return
        if pending is None:
            self._dispatch(ex, fresh=False)
        else:
            self.server.spawn(self._await_stages(ex, pending))

    async def _await_stages(self, ex: Exchange, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception as e:
            self._stage_failed(ex, e)
            return
        if not self.closed and ex is self.active:
            self._dispatch(ex, fresh=False)

    def _stage_failed(self, ex: Exchange, e: Exception) -> None:
        """A stage refused (GatewayError), answered itself (DirectResponse), or broke (a bug: 500)."""
        if isinstance(e, GatewayError):
            self._reject(ex, e)
        elif isinstance(e, DirectResponse):
            self._write_response(ex, e.status, e.headers, e.body, b"")
        else:
            log.error("request pipeline failed", exc_info=e)
            self._reject(ex, GatewayError("internal_error", "the gateway failed to handle this request"))

    def _dispatch(self, ex: Exchange, fresh: bool) -> None:
        route = ex.route
        assert route is not None
        up = route.pick()
        if ex.expect_continue == 1 and ex.version == b"1.1" and not ex.body_received and not ex.body_complete:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        ex.expect_continue = 0
        extra = [
            (b"x-forwarded-for", ex.xff),
            (b"x-forwarded-proto", self.server.scheme),
            (b"x-request-id", ex.request_id.encode()),
        ]
        if ex.host_raw:
            extra.append((b"x-forwarded-host", ex.host_raw))
        if ex.upstream_extra:
            extra += ex.upstream_extra
        head = request_head(ex, route, up, extra, ex.upgrade)
        conn = None if fresh else self.server.pool.acquire(up)
        if conn is not None:
            self._send(ex, conn, head)
        else:
            self.server.spawn(self._connect(ex, up, head))

    async def _connect(self, ex: Exchange, up: object, head: bytes) -> None:
        route = ex.route
        assert route is not None
        try:
            conn = await self.server.pool.connect(up, route.config.timeouts.connect)  # type: ignore[arg-type]
        except GatewayError as e:
            if ex is self.active and not self.closed:
                self._reject(ex, e)
            return
        if self.closed or ex is not self.active or ex.done:
            conn.close()
            return
        self._send(ex, conn, head)

    def _send(self, ex: Exchange, conn: UpstreamConnection, head: bytes) -> None:
        now = self.loop.time()
        ex.upstream_started = perf_counter()
        conn.send(ex, self, head, now)
        if self.write_paused and conn.transport is not None:
            conn.transport.pause_reading()
        self._resume(PAUSE_BUFFER)

    # --- callbacks from the upstream connection ---------------------------------------------
    def informational(self, ex: Exchange, status: int, why: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if ex is not self.active or ex.version != b"1.1" or status == 100:
            return  # the gateway answers Expect itself; HTTP/1.0 clients get no 1xx
        lines, _, _ = response_headers(headers, drop_upgrade=True)
        self.transport.write(b"".join([b"HTTP/1.1 %d " % status, why, b"\r\n", *lines, b"\r\n"]))

    def start_response(
        self, ex: Exchange, status: int, why: bytes, lines: list[bytes], length: bytes | None, upgrade: bool
    ) -> None:
        """`lines` are the upstream's header lines as filtered by `response_headers`."""
        if ex is not self.active:
            return
        ex.status = ex.upstream_status = status
        ex.response_started = True
        if self.server.draining:
            ex.keep_alive = False
        head = [b"HTTP/1.1 %d " % status, why, b"\r\n", *lines]
        self.chunked_out = False
        no_body = upgrade or ex.method == "HEAD" or status in (204, 304)
        if length is not None and status != 204:
            head += (b"Content-Length: ", length, b"\r\n")
        elif not no_body:
            if ex.version == b"1.1":
                head.append(b"Transfer-Encoding: chunked\r\n")
                self.chunked_out = True
            else:
                ex.keep_alive = False  # HTTP/1.0: the body ends when the connection does
        for name, value in ex.response_extra:
            head += (name, b": ", value, b"\r\n")
        head += (b"X-Request-ID: ", ex.request_id.encode(), b"\r\n")
        if not upgrade:
            if not ex.keep_alive:
                head.append(b"Connection: close\r\n")
            elif ex.version == b"1.0":
                head.append(b"Connection: keep-alive\r\n")
        head.append(b"\r\n")
        # Held back until the first body bytes or the end: a small response then leaves in one
        # write (one syscall) instead of two. The upstream's read callback flushes it in any case.
        self.head_pending = b"".join(head)

    def flush_head(self) -> None:
        head = self.head_pending
        if head:
            self.head_pending = b""
            if not self.closed:
                self.transport.write(head)

    def response_body(self, ex: Exchange, chunk: bytes) -> None:
        if ex is not self.active or not chunk:
            return
        ex.bytes_out += len(chunk)
        head = self.head_pending
        if head:
            self.head_pending = b""
        if self.chunked_out:
            frame = (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            self.transport.writelines((head, *frame) if head else frame)
        elif head:
            self.transport.writelines((head, chunk))
        else:
            self.transport.write(chunk)

    def response_done(self, ex: Exchange, conn: UpstreamConnection) -> None:
        if ex is not self.active:
            conn.close()
            return
        end = b"0\r\n\r\n" if self.chunked_out else b""
        self.chunked_out = False
        head = self.head_pending
        if head or end:
            self.head_pending = b""
            self.transport.write(head + end)
        ex.upstream = None
        ex.upstream_ended = perf_counter()
        self.server.pool.release(conn)
        self._complete(ex)

    def upstream_failed(self, ex: Exchange, err: GatewayError, retry: bool) -> None:
        if ex is not self.active or self.closed:
            return
        ex.upstream = None
        if retry and not ex.retried and not ex.response_started and ex.method in IDEMPOTENT:
            ex.retried = True  # a pooled connection the upstream had already closed: one fresh try
            self._dispatch(ex, fresh=True)
            return
        self._reject(ex, err)

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        self.flush_head()
        ex = self.active
        self.tunnel = conn
        self.deadline = INF
        self.deadline_kind = 0
        if ex is not None:
            ex.done = True
            ex.upstream = None
            self.active = None
            self.server.record(ex)
        if self.upgrade_rest:
            conn.tunnel_write(self.upgrade_rest)
            self.upgrade_rest = b""

    def tunnel_write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    # --- ending exchanges -------------------------------------------------------------------
    def _complete(self, ex: Exchange) -> None:
        self.active = None
        ex.done = True
        self.server.record(ex)
        if self.closed or self.closing:
            return
        if not ex.keep_alive or not ex.body_complete or (self.server.draining and not self.queue):
            self._close()
            return
        cur = self.current
        if cur is ex:
            cur = None  # answered from inside its own parse (an error): its message ends in this read
        if cur is not None:
            # A pipelined request still arriving: a deadline that passed while this exchange ran was
            # dropped, so arm it again (a head counts from its first byte, a body gets a fresh pause).
            if self.in_body:
                self.deadline = self.loop.time() + self.server.body_timeout
                self.deadline_kind = D_BODY
            else:
                self.deadline = cur.started + self.server.header_timeout
                self.deadline_kind = D_HEADER
        if self.queue:
            self.loop.call_soon(self._start_next)
            return
        if self.final_error is not None:
            self._write_problem(None, self.final_error, close=True)
            return
        if self.stop_parsing:
            self._close()
            return
        if cur is None:
            self.deadline = self.loop.time() + self.server.idle_timeout
            self.deadline_kind = D_IDLE

    def _reject(self, ex: Exchange, err: GatewayError) -> None:
        if ex.upstream is not None:
            ex.upstream.abort()
            ex.upstream = None
        if ex.done:
            return
        if ex.response_started or self.closed:
            ex.done = True
            ex.error_code = err.code
            self.active = None
            self.server.record(ex)
            self.abort()
            return
        ex.error_code = err.code
        headers = err.headers + ex.response_extra if ex.response_extra else err.headers
        if err.close:
            ex.keep_alive = False
        self._write_response(ex, err.status, headers, err.body(ex.request_id), b"application/problem+json")

    def _write_response(
        self, ex: Exchange, status: int, headers: list[tuple[bytes, bytes]], body: bytes, ctype: bytes
    ) -> None:
        """Answer an exchange from the gateway itself (an error, a preflight)."""
        ex.status = status
        ex.response_started = True
        ex.bytes_out = len(body)
        if not ex.body_complete and ex.keep_alive and self._can_discard(ex):
            # A small body behind a refusal: read and drop it, and keep the connection (as nginx does).
            self._write_simple(status, headers, body, ctype, ex.request_id, False, ex.method == "HEAD")
            ex.discarding = True
            return
        if not ex.body_complete:
            ex.keep_alive = False
        self._write_simple(status, headers, body, ctype, ex.request_id, not ex.keep_alive, ex.method == "HEAD")
        if not ex.body_complete and not self.closed:
            self._linger()
            ex.done = True
            self.active = None
            self.server.record(ex)
            return
        self._complete(ex)

    def _can_discard(self, ex: Exchange) -> bool:
        """Only a declared, small rest of a body being read now, from a client not waiting on 100."""
        return (
            ex is self.current
            and ex.body_kind == BODY_LENGTH
            and ex.content_length - ex.body_received <= DISCARD_LIMIT
            and ex.expect_continue != 1
            and not self.stop_parsing
        )

    def _write_problem(self, ex: Exchange | None, err: GatewayError, close: bool) -> None:
        self._write_simple(err.status, err.headers, err.body(None), b"application/problem+json", "", close, False)
        if close:
            self._linger()  # the client may still be sending: a plain close would RST the answer away

    def _write_simple(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        ctype: bytes,
        request_id: str,
        close: bool,
        head_only: bool,
    ) -> None:
        parts = [b"HTTP/1.1 %d " % status, reason(status), b"\r\nDate: ", self.server.date, b"\r\n"]
        if body:
            parts += (b"Content-Type: ", ctype, b"\r\n")
        parts += (b"Content-Length: %d\r\n" % len(body),)
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if request_id:
            parts += (b"X-Request-ID: ", request_id.encode(), b"\r\n")
        if status == 401:
            parts.append(b'WWW-Authenticate: Bearer realm="gateway"\r\n')
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if not head_only:
            parts.append(body)
        if not self.closed:
            self.transport.write(b"".join(parts))

    def _linger(self) -> None:
        """Stop reading requests, half-close, and drain the client's unread body for a moment.

        Closing with unread bytes makes the kernel send RST, and the client may lose the answer.
        """
        self.stop_parsing = True
        self.closing = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.deadline = self.loop.time() + LINGER
        self.deadline_kind = D_LINGER

    def on_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        self.deadline = INF
        if kind == D_HEADER and self.current is not None and self.active is None and not self.queue:
            self.stop_parsing = True
            self._write_problem(None, GatewayError("request_timeout", "the request head took too long", close=True), True)
        elif kind == D_BODY and self.active is not None and self.active is self.current:
            self.stop_parsing = True
            self._reject(self.active, GatewayError("request_timeout", "the request body stalled", close=True))
            self._close()
        elif kind in (D_HEADER, D_BODY, D_IDLE, D_LINGER) and self.active is None:
            self.closing = True
            if kind == D_LINGER:
                self.transport.abort()
            else:
                self.transport.close()

    # --- flow control -----------------------------------------------------------------------
    def _pause(self, bit: int) -> None:
        if not self.read_paused and not self.closed:
            self.transport.pause_reading()
        self.read_paused |= bit

    def _resume(self, bit: int) -> None:
        if self.read_paused & bit:
            self.read_paused &= ~bit
            if not self.read_paused and not self.closed:
                self.transport.resume_reading()

    def pause_reading_for(self, conn: UpstreamConnection) -> None:
        self._pause(PAUSE_UPSTREAM)

    def resume_reading_for(self, conn: UpstreamConnection) -> None:
        self._resume(PAUSE_UPSTREAM)

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.tunnel or (self.active.upstream if self.active else None)
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.tunnel or (self.active.upstream if self.active else None)
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()


def _parser_reason(e: Exception) -> str:
    """llhttp's reason, without echoing any of the client's bytes back."""
    text = str(e)
    return text.split(":", 1)[0][:80] if text else type(e).__name__
