"""The client side of the data path: an asyncio protocol on llhttp (httptools, strict).

Requests are parsed as bytes arrive and answered strictly in order (pipelining). Bodies stream:
a request body goes straight to the upstream socket once the checks pass, and is buffered only
up to a high-water mark before that, with reading paused past it. The layers below this one
(`connection`, `responses`, `forwarding`) hold the rest of the protocol.
"""

from __future__ import annotations

import logging
from time import perf_counter

import httptools

from gateway.errors import GatewayError
from gateway.http.connection import D_BODY, D_HEADER, INF, PAUSE_BUFFER
from gateway.http.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, Exchange
from gateway.http.forwarding import Forwarding

log = logging.getLogger("gateway.http")

HIGH_WATER = 256 * 1024


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the reason is kept on the connection."""


class ClientConnection(Forwarding):
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
        if self.active is None and not self.queue and self.deadline_kind != D_HEADER:
            # From the first byte after an idle keep-alive wait. A new connection's header deadline
            # runs from its accept (connection_made), so a first byte sent late buys no time.
            self.deadline = self.loop.time() + self.server.header_timeout
            self.deadline_kind = D_HEADER

    def on_url(self, url: bytes) -> None:
        ex = self.current
        if ex is None:
            return
        ex.target += url
        self.head_bytes += len(url)
        if self.head_bytes > self.server.max_header_bytes or len(ex.target) > self.server.max_header_line:
            self._refuse(GatewayError("headers_too_large", "the request target is too long", close=True))

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.current
        if ex is None:
            return
        line = len(name) + len(value) + 2
        self.head_bytes += line + 2
        self.header_count += 1
        if self.head_bytes > self.server.max_header_bytes or self.header_count > self.server.max_headers:
            self._refuse(GatewayError("headers_too_large", "the request's header section is too large", close=True))
        if line > self.server.max_header_line:
            self._refuse(GatewayError("headers_too_large", "a request header line is too long", close=True))
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


def _parser_reason(e: Exception) -> str:
    """llhttp's reason, without echoing any of the client's bytes back."""
    text = str(e)
    return text.split(":", 1)[0][:80] if text else type(e).__name__
