"""A client connection's state, its opening and closing, and its flow control.

The client side of the data path is one asyncio protocol, `server.ClientConnection`, built in
layers, each holding one part of a request's way through it: this base, `responses` (relaying the
upstream's answer, answering from the gateway, ending exchanges), `forwarding` (the stages, then
the upstream) and `server` (parsing). The layers are classes, not objects that call each other, so
a call between them costs what a method call on one class costs.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import httptools

from gateway.errors import GatewayError
from gateway.http.exchange import Exchange

if TYPE_CHECKING:
    from gateway.http.upstream import UpstreamConnection
    from gateway.proxy import ProxyServer

INF = float("inf")
PAUSE_BUFFER = 1
PAUSE_UPSTREAM = 2

# What a closed connection's `parser` becomes. A parser holds its protocol's bound callbacks, so a
# live one makes a reference cycle with its connection: broken at close, a connection is freed by
# reference counting alone, even when the collector no longer looks at it (`gateway.heap`).
DETACHED = httptools.HttpRequestParser(object())

# What a deadline means when it passes.
D_HEADER, D_BODY, D_IDLE, D_LINGER = 1, 2, 3, 4


class ConnectionBase(asyncio.Protocol):
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
        self.parser = DETACHED
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

    def on_deadline(self, now: float) -> None:
        """Called by the server's ticker once `deadline` has passed; `deadline_kind` says what for."""
        raise NotImplementedError

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
