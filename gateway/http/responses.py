"""Writing to the client: the upstream's answer relayed, the gateway's own answers, and the end
of each exchange (the next one, a close, or a linger while an unread body drains)."""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING

from gateway.errors import GatewayError, reason
from gateway.http.connection import D_BODY, D_HEADER, D_IDLE, D_LINGER, INF, ConnectionBase
from gateway.http.exchange import BODY_LENGTH, Exchange
from gateway.http.heads import response_headers

if TYPE_CHECKING:
    from gateway.http.upstream import UpstreamConnection

LINGER = 2.0
DISCARD_LIMIT = 64 * 1024


class Responses(ConnectionBase):
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

    def _start_next(self) -> None:
        """Begin the next queued exchange (the forwarding layer's)."""
        raise NotImplementedError
